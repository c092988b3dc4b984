"""Test-time views averaged inside the exported model (`model.serving_views`).

Plain Python, so the configuration validates them before any work starts without
importing TensorFlow.
"""
from __future__ import annotations

from typing import List, Sequence

VIEWS = ('full', 'flip', 'crop:<fraction>')


def parse_views(views: Sequence[str]) -> List[str]:
  """Validates `model.serving_views`: `full` (the contract's whole photo), `flip` (mirrored),
  `crop:<f>` (the central fraction f of each side, resized back)."""
  if not views:
    raise ValueError('model.serving_views: give at least one view (e.g. [full])')
  out = []
  for v in views:
    v = str(v).strip()
    if v.startswith('crop:'):
      try:
        frac = float(v[5:])
      except ValueError:
        frac = -1.0
      if not 0.3 <= frac < 1.0:
        raise ValueError(f'model.serving_views: {v!r} needs a fraction in [0.3, 1), e.g. crop:0.875')
    elif v not in ('full', 'flip'):
      raise ValueError(f'model.serving_views: unknown view {v!r} (one of {", ".join(VIEWS)})')
    out.append(v)
  return out

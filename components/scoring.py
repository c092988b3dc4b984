"""Scoring a model's probabilities on labelled photos: accuracy, calibration, answers, gates.

Numpy only (no TensorFlow): shared by the TFLite gate, `carvision evaluate` and the report.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional, Sequence

import numpy as np

from carvision.components import calibration
from carvision.components import decision
from carvision.components import names
from carvision.components.decision import make_of


def thresholds(serve_cfg, saved: Optional[Dict]) -> Dict:
  """class_min_confidence / make_min_confidence / target_precision: a number in the config
  wins, else the model's own (chosen on validation), else None (no decision)."""
  saved = saved or {}
  out = {}
  for key in ('class_min_confidence', 'make_min_confidence'):
    v = getattr(serve_cfg, key, None) if serve_cfg is not None else None
    out[key] = v if v is not None else saved.get(key)
  out['target_precision'] = (getattr(serve_cfg, 'target_precision', None)
                             or saved.get('target_precision') or names.TARGET_PRECISION)
  return out


def score(probs: np.ndarray, labels: List[str], truth: Sequence[str],
          groups: Optional[Sequence] = None, top_confusions: int = 10,
          answers: Optional[Dict] = None, worst: int = 10) -> Dict:
  """top-1/top-5, make-level accuracy, per-make top-1, worst makes, confused pairs,
  risk-coverage of class and make answers (and the decision at `answers`' thresholds);
  per group (ad) too.

  A true class the model has no output for counts as wrong (it cannot be predicted).
  """
  index = {l: i for i, l in enumerate(labels)}
  order = np.argsort(-probs, axis=1)
  pred = order[:, 0]
  y = np.array([index.get(t, -1) for t in truth])
  top1 = pred == y
  top5 = np.array([y[i] in order[i, :5] for i in range(len(y))])
  make_ok = np.array([make_of(labels[p]) == make_of(t) for p, t in zip(pred, truth)])
  per_make = collections.defaultdict(lambda: [0, 0])
  confusions = collections.Counter()
  for p, t, ok in zip(pred, truth, top1):
    per_make[make_of(t)][0] += int(ok)
    per_make[make_of(t)][1] += 1
    if not ok:
      confusions[(t, labels[p])] += 1
  out = {'examples': int(len(y)), 'top1_accuracy': float(top1.mean()) if len(y) else None,
         'top5_accuracy': float(top5.mean()) if len(y) else None,
         'make_accuracy': float(make_ok.mean()) if len(y) else None,
         'unknown_classes': int((y < 0).sum()),
         # calibration of the top-1 probability (15 bins), photos of known classes
         'ece': calibration.ece(probs[y >= 0], y[y >= 0]) if (y >= 0).any() else None,
         # what a perfectly calibrated model would score here: ECE's floor at this size
         'ece_floor': calibration.ece_floor(probs[y >= 0]) if (y >= 0).any() else None,
         # the reliability diagram behind it: per confidence bin, photos / confidence / accuracy
         'reliability': (calibration.reliability(probs[y >= 0], y[y >= 0])
                         if (y >= 0).any() else None),
         'per_make': {m: {'top1_accuracy': c / n, 'examples': n}
                      for m, (c, n) in sorted(per_make.items())},
         'worst_makes': [{'make': m, 'top1_accuracy': round(c / n, 4), 'examples': n}
                         for m, (c, n) in sorted(per_make.items(),
                                                 key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1]))
                         ][:worst],
         # accuracy of the answered share against the share answered (class, make)
         'answers': _answers(probs, labels, y, answers),
         'confused_pairs': [{'true': t, 'predicted': p, 'count': n}
                            for (t, p), n in confusions.most_common(top_confusions)]}
  if groups is not None:
    by = collections.defaultdict(list)
    for i, g in enumerate(groups):
      by[g].append(i)
    keys = sorted(by)
    agg = np.stack([probs[by[g]].mean(axis=0) for g in keys])
    ad_truth = [truth[by[g][0]] for g in keys]
    ad = score(agg, labels, ad_truth, None, 0, answers=answers)
    out['per_ad'] = {k: ad[k] for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                        'make_accuracy', 'answers')}
  return out


def _answers(probs, labels, y, answers: Optional[Dict]) -> Optional[Dict]:
  if not len(y) or not (y >= 0).any():
    return None
  answers = answers or {}
  return decision.evaluate(probs, labels, y, answers.get('class_min_confidence'),
                           answers.get('make_min_confidence'),
                           answers.get('target_precision') or names.TARGET_PRECISION)


def make_check(metrics: Dict, min_top1: Optional[float], min_photos: int) -> Optional[Dict]:
  """The optional per-make gate: every make with >= min_photos photos reaches min_top1."""
  if min_top1 is None:
    return None
  eligible = {m: v for m, v in metrics.get('per_make', {}).items() if v['examples'] >= min_photos}
  if not eligible:
    return {'value': None, 'threshold': min_top1, 'pass': True,
            'detail': f'no make has {min_photos} photos'}
  worst = min(eligible, key=lambda m: eligible[m]['top1_accuracy'])
  v = eligible[worst]
  below = sorted(m for m, x in eligible.items() if x['top1_accuracy'] < min_top1 - 1e-9)
  return {'value': v['top1_accuracy'], 'threshold': min_top1, 'pass': not below,
          'detail': (f"worst make {worst} ({v['examples']} photos); below: {', '.join(below[:10])}"
                     if below else f"worst make {worst} ({v['examples']} photos)")}


def verdicts(metrics: Dict, gates: Dict[str, float]) -> Dict[str, Dict]:
  """{metric: {value, threshold, pass}} for floors like {'top1_accuracy': 0.8}."""
  out = {}
  for name, floor in gates.items():
    v = metrics.get(name)
    out[name] = {'value': v, 'threshold': floor, 'pass': v is not None and v >= floor - 1e-9}
  return out

"""Progress lines: what a run prints while it works (one leaf module for the pipeline and
the Trainer)."""
from __future__ import annotations


def say(line: str) -> None:
  """A progress line on stdout, flushed, also when it goes to a file."""
  print(f'[carvision] {line}', flush=True)


def duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'

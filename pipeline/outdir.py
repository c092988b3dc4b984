"""An output directory written whole or not at all: `carvision ingest --out`.

The run writes into a sibling staging directory and renames it into place at the end,
under an exclusive lock, so a reader never sees old and new shards side by side, an
interrupted run leaves nothing (its staging directory is removed by the next run), and
two runs into one directory do not interleave. A non-empty directory is replaced only
with --overwrite.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
from typing import Iterator

from carvision.components.errors import BusyError, UserError


@contextlib.contextmanager
def fresh_output(out: str, overwrite: bool) -> Iterator[str]:
  """Yields the staging directory to write; on success it becomes `out`."""
  if '://' in out:
    raise UserError(f'--out {out}: a local directory (write remote artifacts with `carvision run`)')
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out {out} is a file, not a directory')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f'--out {out} is not empty: pass --overwrite to replace it')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(out)
  with open(os.path.join(parent, f'.{base}.lock'), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise BusyError(f'--out {out}: another carvision ingest is writing there; wait for it '
                      'or choose another --out') from None
    for stale in glob.glob(os.path.join(parent, f'.{base}.partial-*')):
      shutil.rmtree(stale, ignore_errors=True)  # an interrupted run's
    staging = os.path.join(parent, f'.{base}.partial-{os.getpid()}')
    os.makedirs(staging)
    try:
      yield staging
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    old = os.path.join(parent, f'.{base}.old-{os.getpid()}')
    if os.path.exists(out):
      os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)

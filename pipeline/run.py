"""Launching the pipeline on the direct runner (what it did: pipeline/summary.py)."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Optional

from pipeline.config import Config


def card_extras(data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Model-card fields known only to the launcher: command, code version, data manifest."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pipeline.config import REPO_ROOT  # pylint: disable=g-import-not-at-top
  try:
    code = subprocess.run(['git', '-C', REPO_ROOT, 'describe', '--always', '--dirty'],
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    try:
      code = 'carvision ' + metadata.version('carvision')
    except metadata.PackageNotFoundError:
      code = 'unknown'
  out: Dict[str, Any] = {'command': 'carvision ' + ' '.join(sys.argv[1:]), 'code_version': code,
                         'machine': machine()}
  manifest = os.path.join(data_dir, 'manifest.json') if data_dir else None
  if manifest and os.path.exists(manifest):
    with open(manifest) as f:
      m = json.load(f)
    out['data'] = {'manifest': {'name': m.get('name'), 'path': os.path.abspath(manifest),
                                'images_sha256': m.get('images', {}).get(
                                    'sha256_of_sorted_phash_filesha_list'),
                                'counts': m.get('counts')}}
  return out


def machine() -> Dict[str, Any]:
  """What a timing depends on: CPU model, cores, vector extensions (AVX-512 trains ~3x faster
  than AVX2 here), memory."""
  import platform  # pylint: disable=g-import-not-at-top
  info: Dict[str, Any] = {'cores': os.cpu_count(), 'cpu': platform.processor() or None}
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
    name = next((ln.split(':', 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith('model name')), None)
    flags = next((ln.split(':', 1)[1].split() for ln in text.splitlines()
                  if ln.startswith('flags')), [])
    info['cpu'] = name or info['cpu']
    info['cpu_flags'] = sorted(f for f in set(flags) if f.startswith('avx512') or f in
                               ('avx2', 'fma', 'amx_bf16', 'amx_int8'))
  except OSError:
    pass
  try:
    info['memory_gib'] = round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1)
  except (ValueError, OSError):
    pass
  return info


def run_direct(cfg: Config, card: Optional[Dict[str, Any]] = None) -> None:
  """BeamDagRunner; the Beam components use the DirectRunner with cfg.pipeline.beam_args."""
  from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner  # pylint: disable=g-import-not-at-top
  from pipeline.pipeline import create_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(cfg.path(cfg.pipeline.metadata)), exist_ok=True)
  card = card if card is not None else card_extras()
  with root_lock(cfg), private_tmpdir():
    BeamDagRunner().run(create_pipeline(cfg, started(card)))


LOCK_NAME = '.carvision.lock'
_HELD: set = set()  # roots this process holds (root_lock nests)


@contextlib.contextmanager
def root_lock(cfg: Config, fresh: bool = False):
  """One run at a time on a pipeline root: a second `run` (or `demo`) on it stops at once
  with the first one's pid and command instead of sharing its ML Metadata and artifacts.
  The lock is the kernel's (flock), so a killed run never leaves it held."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from components.errors import BusyError  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  root = cfg.path(cfg.pipeline.root)
  if '://' in root or root in _HELD:  # remote (Dataflow/Vertex): its orchestrator serialises runs
    yield
    return
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, LOCK_NAME)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise BusyError(f'pipeline root {root} is in use by {holder}: wait for it to finish, or '
                      'set pipeline.root (and pipeline.metadata) elsewhere') from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} (carvision {' '.join(sys.argv[1:2])}, since "
            f"{time.strftime('%H:%M:%S')})\n")
    f.flush()
    _HELD.add(root)
    try:
      if fresh:  # `demo --fresh`: everything but the lock, under the lock
        for name in os.listdir(root):
          if name != LOCK_NAME:
            full = os.path.join(root, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
      yield
    finally:
      _HELD.discard(root)
      f.seek(0)
      f.truncate()


@contextlib.contextmanager
def private_tmpdir():
  """TMPDIR for one run, removed after it. Each Beam component leaves an sdist of TFX there
  (tfx's dependency_utils repackages its own installation, 52 MB a time, and never deletes
  it): 7 GB of them had piled up in one environment's /tmp."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  before, cached = os.environ.get('TMPDIR'), tempfile.tempdir
  tmp = tempfile.mkdtemp(prefix='carvision-run-')
  os.environ['TMPDIR'], tempfile.tempdir = tmp, None  # workers started from here inherit it
  try:
    yield tmp
  finally:
    if before is None:
      os.environ.pop('TMPDIR', None)
    else:
      os.environ['TMPDIR'] = before
    tempfile.tempdir = cached
    shutil.rmtree(tmp, ignore_errors=True)


def started(card: Dict[str, Any]) -> Dict[str, Any]:
  """The card stamped with now: its wall time runs from here (ingestion included) to the push."""
  import datetime  # pylint: disable=g-import-not-at-top
  return {**card, 'run_started': datetime.datetime.now(datetime.timezone.utc).isoformat()}

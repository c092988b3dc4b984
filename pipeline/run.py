"""Launching the pipeline on the direct runner (what it did: pipeline/summary.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Dict, Optional

from carvision.components.errors import BusyError
from carvision.components.progress import duration, say
from carvision.pipeline.config import REPO_ROOT, Config
from carvision.pipeline.pipeline import RESUME_DIR, create_pipeline


def card_extras(data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Model-card fields known only to the launcher: command, code version, data manifest."""
  out: Dict[str, Any] = {'command': 'carvision ' + ' '.join(sys.argv[1:]),
                         'code_version': code_version(), 'machine': machine()}
  manifest = os.path.join(data_dir, 'manifest.json') if data_dir else None
  if manifest and os.path.exists(manifest):
    with open(manifest) as f:
      m = json.load(f)
    out['data'] = {'manifest': {'name': m.get('name'), 'path': os.path.abspath(manifest),
                                'images_sha256': m.get('images', {}).get(
                                    'sha256_of_sorted_phash_filesha_list'),
                                'counts': m.get('counts')}}
  return out


def code_version() -> str:
  """git describe of the code that runs: from scripts/env.sh (CARVISION_CODE_VERSION: git on the
  host, since the environment has none), else git here, else the installed package's version."""
  code = os.environ.get('CARVISION_CODE_VERSION', '').strip()
  if code:
    return code
  try:
    return subprocess.run(['git', '-C', REPO_ROOT, 'describe', '--always', '--dirty'],
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    try:
      return 'carvision ' + metadata.version('carvision')
    except metadata.PackageNotFoundError:
      return 'unknown'


def machine() -> Dict[str, Any]:
  """What a timing depends on: CPU model, cores, vector extensions (AVX-512 trains ~3x faster
  than AVX2 here), memory."""
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


RUN_STATE = '.carvision-run.json'  # in the pipeline root: the last run's identity and status


def progress_runner():
  """TFX's BeamDagRunner, with one line as each component starts and as it ends."""
  from tfx.orchestration.beam import beam_dag_runner  # pylint: disable=g-import-not-at-top

  class Node(beam_dag_runner.PipelineNodeAsDoFn):

    def process(self, element, *signals):
      shown = not self._node_id.endswith('resolver')  # a lookup, not a step of its own
      t0 = time.time()
      if shown:
        say(f'{self._node_id} ...')
      super().process(element, *signals)
      if shown:
        say(f'{self._node_id} done in {duration(time.time() - t0)}')

  class Runner(beam_dag_runner.BeamDagRunner):
    _PIPELINE_NODE_DO_FN_CLS = Node

  return Runner()


def run_identity(cfg: Config, data_dir: Optional[str] = None) -> str:
  """What makes two launches the same run: the whole config and the data. With `--data`
  the throwaway database's and photo host's addresses change every launch; the data set
  is then named by its manifest (or its path)."""
  d = dataclasses.asdict(cfg)
  if data_dir:
    d['ingest']['dsn'] = d['ingest']['image_url_template'] = None
    manifest = os.path.join(data_dir, 'manifest.json')
    d['data'] = (hashlib.sha256(open(manifest, 'rb').read()).hexdigest()
                 if os.path.exists(manifest) else os.path.abspath(data_dir))
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed_nodes(cfg: Config) -> set:
  """The nodes whose execution in the latest pipeline run (ML Metadata) completed or was
  reused: what a resumed run does not do again."""
  from ml_metadata.metadata_store import metadata_store  # pylint: disable=g-import-not-at-top
  from ml_metadata.proto import metadata_store_pb2  # pylint: disable=g-import-not-at-top
  path = cfg.path(cfg.pipeline.metadata)
  if not os.path.exists(path):
    return set()
  conn = metadata_store_pb2.ConnectionConfig()
  conn.sqlite.filename_uri = path
  conn.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
  store = metadata_store.MetadataStore(conn)
  runs = sorted(store.get_contexts_by_type('pipeline_run'), key=lambda c: c.create_time_since_epoch)
  if not runs:
    return set()
  ok = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
  prefix = cfg.pipeline.name + '.'
  done = set()
  for e in store.get_executions_by_context(runs[-1].id):
    if e.last_known_state in ok:
      for c in store.get_contexts_by_execution(e.id):
        if c.name.startswith(prefix) and c.type_id != runs[-1].type_id:
          done.add(c.name[len(prefix):])
  return done


def _read_state(root: str) -> Dict[str, Any]:
  try:
    with open(os.path.join(root, RUN_STATE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_state(root: str, state: Dict[str, Any]) -> None:
  tmp = os.path.join(root, RUN_STATE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(state, f)
  os.replace(tmp, os.path.join(root, RUN_STATE))


def run_direct(cfg: Config, card: Optional[Dict[str, Any]] = None,
               data_dir: Optional[str] = None, restart: bool = False) -> Dict[str, Any]:
  """BeamDagRunner; the Beam components use the DirectRunner with cfg.pipeline.beam_args.

  The same launch after a stop (same config, same data, the last run unfinished) resumes
  it: nodes that completed are not run again (TFX partial run from the incomplete ones,
  reusing the stopped run's artifacts) and the Trainer goes on from its checkpoints.
  `restart` starts over. Returns the run state (key, started, resumes, status)."""
  from tfx.orchestration import pipeline as tfx_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(cfg.path(cfg.pipeline.metadata)), exist_ok=True)
  card = dict(card if card is not None else card_extras())
  root = cfg.path(cfg.pipeline.root)
  with root_lock(cfg), private_tmpdir():
    state, key = _read_state(root), run_identity(cfg, data_dir)
    resuming = (not restart and state.get('key') == key and state.get('status') == 'running')
    done = completed_nodes(cfg) if resuming else set()
    if not resuming:
      shutil.rmtree(os.path.join(root, RESUME_DIR), ignore_errors=True)  # another run's
      state = {'key': key, 'status': 'running', 'resumes': 0,
               'started': datetime.datetime.now(datetime.timezone.utc).isoformat()}
    else:
      state['resumes'] = int(state.get('resumes', 0)) + 1
    pipeline = create_pipeline(cfg, {**card, 'run_started': state['started'],
                                     'resumes': state['resumes']})
    order = [c.id for c in pipeline.components]
    todo = [n for n in order if n not in done]
    _write_state(root, state)
    if resuming:
      print(f"[carvision] resuming the stopped run (resume {state['resumes']}): kept "
            f"{', '.join(n for n in order if n in done) or 'nothing'}; to run: "
            f"{', '.join(todo) or 'nothing'}", flush=True)
    if todo:
      options = None
      if done & set(order):  # a partial run from the first incomplete nodes
        options = tfx_pipeline.RunOptions(from_nodes=todo, to_nodes=order)
      progress_runner().run(pipeline, run_options=options)
    state['status'] = 'finished'
    _write_state(root, state)
    shutil.rmtree(os.path.join(root, RESUME_DIR), ignore_errors=True)
  return state


LOCK_NAME = '.carvision.lock'
_HELD: set = set()  # roots this process holds (root_lock nests)


@contextlib.contextmanager
def root_lock(cfg: Config, fresh: bool = False):
  """One run at a time on a pipeline root: a second `run` (or `demo`) on it stops at once
  with the first one's pid and command instead of sharing its ML Metadata and artifacts.
  The lock is the kernel's (flock), so a killed run never leaves it held."""
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
  """TMPDIR for one run, removed after it: each Beam component leaves an sdist of TFX there
  (tfx's dependency_utils repackages its own installation, about 50 MB, and never deletes it)."""
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
  return {**card, 'run_started': datetime.datetime.now(datetime.timezone.utc).isoformat()}

"""Running the pipeline and reading back what it did (from ML Metadata) as a summary."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from pipeline.config import Config


def run_direct(cfg: Config) -> None:
  """BeamDagRunner; the Beam components use the DirectRunner with cfg.pipeline.beam_args."""
  from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner  # pylint: disable=g-import-not-at-top
  from pipeline.pipeline import create_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(cfg.path(cfg.pipeline.metadata)), exist_ok=True)
  BeamDagRunner().run(create_pipeline(cfg))


def _latest(store, type_name: str, pipeline_name: str):
  arts = store.get_artifacts_by_type(type_name)
  ctx = store.get_context_by_type_and_name('pipeline', pipeline_name)
  if ctx is not None:
    ids = {a.id for a in store.get_artifacts_by_context(ctx.id)}
    arts = [a for a in arts if a.id in ids]
  arts = [a for a in arts if a.state == a.LIVE] or arts
  return max(arts, key=lambda a: a.id) if arts else None


def _prop(art, name: str, default=None):
  if art is None:
    return default
  for props in (art.custom_properties, art.properties):
    if name in props:
      v = props[name]
      which = v.WhichOneof('value')
      return getattr(v, which) if which else default
  return default


def summarize(cfg: Config) -> Dict[str, Any]:
  """Rows, examples per split, dead letters, metrics vs thresholds, blessing, push location."""
  import ml_metadata as mlmd  # pylint: disable=g-import-not-at-top
  from ml_metadata.proto import metadata_store_pb2  # pylint: disable=g-import-not-at-top
  conn = metadata_store_pb2.ConnectionConfig()
  conn.sqlite.filename_uri = cfg.path(cfg.pipeline.metadata)
  conn.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
  store = mlmd.MetadataStore(conn)
  name = cfg.pipeline.name
  dead = _latest(store, 'carvision.DeadLetters', name)
  ingest = json.loads(_prop(dead, 'summary', '{}') or '{}')
  evaluation = _latest(store, 'ModelEvaluation', name)
  blessing = _latest(store, 'ModelBlessing', name)
  pushed = _latest(store, 'PushedModel', name)
  metrics = read_metrics(evaluation.uri) if evaluation is not None else {}
  failed = read_failures(evaluation.uri) if evaluation is not None else {}
  thresholds = {'top1_accuracy': cfg.evaluate.top1_min, 'top5_accuracy': cfg.evaluate.top5_min}
  return {
      'config': cfg.source_file,
      'rows': ingest.get('rows'),
      'examples': ingest.get('examples'),
      'dead_letters': ingest.get('dead_letters'),
      'dead_letters_uri': dead.uri if dead is not None else None,
      # Pass/fail is TFMA's verdict (the one that blesses), not recomputed here.
      'metrics': {k: {'value': metrics.get(k), 'threshold': v,
                      'pass': metrics.get(k) is not None and k not in failed,
                      'failure': failed.get(k)}
                  for k, v in thresholds.items()},
      'eval_examples': metrics.get('example_count'),
      'blessed': bool(_prop(blessing, 'blessed', 0)),
      'pushed': bool(_prop(pushed, 'pushed', 0)),
      'pushed_to': _prop(pushed, 'pushed_destination') if _prop(pushed, 'pushed', 0) else None,
  }


def read_metrics(eval_uri: str) -> Dict[str, Optional[float]]:
  """Overall-slice metrics of an Evaluator output."""
  from tfx import v1  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_model_analysis as tfma  # pylint: disable=g-import-not-at-top
  out: Dict[str, Optional[float]] = {}
  for m in tfma.load_metrics(eval_uri):
    if m.slice_key.single_slice_keys:
      continue
    for kv in m.metric_keys_and_values:
      # Candidate values only: no diffs against the baseline, no baseline's own values.
      if kv.key.is_diff or kv.key.model_name not in ('', 'candidate'):
        continue
      if kv.value.HasField('double_value'):
        out[kv.key.name] = kv.value.double_value.value
  return out


def read_failures(eval_uri: str) -> Dict[str, str]:
  """Metric name -> TFMA's failure message on the overall slice (the one that gates)."""
  from tfx import v1  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_model_analysis as tfma  # pylint: disable=g-import-not-at-top
  result = tfma.load_validation_result(eval_uri)
  out: Dict[str, str] = {}
  for per_slice in result.metric_validations_per_slice:
    if per_slice.slice_key.single_slice_keys:
      continue
    for failure in per_slice.failures:
      out.setdefault(failure.metric_key.name, failure.message)
  return out


def format_summary(s: Dict[str, Any]) -> str:
  lines = ['', '=' * 66, 'carvision pipeline summary', '=' * 66,
           f"config: {s['config']}"]
  ex = s.get('examples') or {}
  dead = s.get('dead_letters') or {}
  lines.append(f"rows read: {s.get('rows')}  = examples {sum(ex.values())} "
               f"({', '.join(f'{k} {v}' for k, v in ex.items())}) + dead letters {sum(dead.values())}")
  for reason, n in dead.items():
    lines.append(f'  dropped {reason:<22} {n}')
  if s.get('dead_letters_uri'):
    lines.append(f"  dead-letter records: {s['dead_letters_uri']}/dead_letters/")
  n_eval = s.get('eval_examples')
  lines.append(f"evaluation on the eval split ({'n/a' if n_eval is None else int(n_eval)} photos):")
  for name, m in s['metrics'].items():
    val = 'n/a' if m['value'] is None else f"{m['value']:.6f}"
    lines.append(f"  {name:<14} {val:>7}  threshold >= {m['threshold']:.2f}  "
                 f"{'PASS' if m['pass'] else 'FAIL'}")
  lines.append('verdict: ' + ('BLESSED' if s['blessed'] else 'NOT BLESSED'))
  lines.append('pushed model: ' + (s['pushed_to'] or 'nothing pushed'))
  lines.append('=' * 66)
  return '\n'.join(lines)

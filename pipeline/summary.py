"""What a pipeline run did, read back from ML Metadata: rows, examples, dead letters, both
gates' figures and verdicts, what was pushed (the command line's summary and its JSON)."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional

from carvision.components import names
from carvision.pipeline.config import REPO_ROOT, SAMPLE_DIR, Config


def _latest(store, type_name: str, pipeline_name: str, producer: Optional[str] = None):
  arts = store.get_artifacts_by_type(type_name)
  if producer:  # artifact URIs are <root>/<component id>/<output key>/<execution id>
    arts = [a for a in arts if f'/{producer}/' in a.uri]
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
  tfma_eval = _latest(store, 'ModelEvaluation', name, 'Evaluator')
  tfma_blessing = _latest(store, 'ModelBlessing', name, 'Evaluator')
  lite_eval = _latest(store, 'ModelEvaluation', name, 'TFLiteEvaluator')
  lite_blessing = _latest(store, 'ModelBlessing', name, 'TFLiteEvaluator')
  pushed = _latest(store, 'PushedModel', name)
  judged = {}
  if lite_eval is not None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    path = os.path.join(lite_eval.uri, names.METRICS_JSON)
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        judged = json.load(f)
  metrics = read_metrics(tfma_eval.uri) if tfma_eval is not None and cfg.evaluate.tfma else {}
  failed = read_failures(tfma_eval.uri) if tfma_eval is not None and cfg.evaluate.tfma else {}
  thresholds = {'top1_accuracy': cfg.evaluate.top1_min, 'top5_accuracy': cfg.evaluate.top5_min}
  blessed = bool(_prop(lite_blessing, 'blessed', 0))
  if cfg.evaluate.tfma:
    blessed = blessed and bool(_prop(tfma_blessing, 'blessed', 0))
  m = judged.get('metrics', {})
  return {
      'config': cfg.source_file,
      'rows': ingest.get('rows'),
      'examples': ingest.get('examples'),
      'dead_letters': ingest.get('dead_letters'),
      'dead_letters_uri': dead.uri if dead is not None else None,
      # The shipped artifact's gate (int8 TFLite, parity, regression): the one that blesses.
      'int8_gate': judged.get('checks', {}),
      'int8_metrics': {k: m.get(k) for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                            'make_accuracy', 'per_ad', 'float', 'ece',
                                            'ece_floor', 'fast')},
      'answers': m.get('answers'),
      'report': os.path.join(lite_eval.uri, names.REPORT_HTML) if judged else None,
      # TFMA's verdict on the float SavedModel (pass/fail as TFMA decided it).
      'metrics': {k: {'value': metrics.get(k), 'threshold': v,
                      'pass': metrics.get(k) is not None and k not in failed,
                      'failure': failed.get(k)}
                  for k, v in thresholds.items()} if cfg.evaluate.tfma else {},
      'test_examples': metrics.get('example_count', m.get('examples')),
      'blessed': blessed,
      'pushed': bool(_prop(pushed, 'pushed', 0)),
      'pushed_to': _prop(pushed, 'pushed_destination') if _prop(pushed, 'pushed', 0) else None,
      'not_pushed_reason': _prop(pushed, 'not_pushed_reason'),
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
  n_test = s.get('test_examples')
  lines.append(f"evaluation on the test split ({'n/a' if n_test is None else int(n_test)} photos, "
               "ads never seen by the Trainer):")
  if s.get('int8_gate'):
    lines.append('  int8 TFLite (the file that ships when both gates pass):' if not s.get('pushed_to')
                 else '  int8 TFLite (the shipped file):')
    for name, c in s['int8_gate'].items():
      val = ('n/a' if c.get('value') is None else str(c['value']) if isinstance(c['value'], int)
             else f"{c['value']:.6f}")
      op = '<=' if name in ('int8_vs_float_top1_drop', 'seen_test_ads') else '>='
      lines.append(f"    {name:<26} {val:>9}  threshold {op} {c['threshold']:.2f}  "
                   f"{'PASS' if c['pass'] else 'FAIL'}" + (f"  ({c['detail']})" if c.get('detail') else ''))
    im = s.get('int8_metrics') or {}
    if im.get('make_accuracy') is not None:
      ad = im.get('per_ad') or {}
      lines.append(f"    make-level top-1 {im['make_accuracy']:.4f}; per ad (photos averaged): "
                   f"top-1 {ad.get('top1_accuracy', float('nan')):.4f} top-5 "
                   f"{ad.get('top5_accuracy', float('nan')):.4f} over {ad.get('examples')} ads")
      if im.get('ece') is not None:
        floor = (f" (a perfectly calibrated model would score about {im['ece_floor']:.4f} on "
                 'these photos)') if im.get('ece_floor') is not None else ''
        lines.append(f"    calibration error (ECE, 15 bins) {im['ece']:.4f}{floor}")
    dec = (s.get('answers') or {}).get('decision')
    if dec:
      lines.append(f"    answers (class >= {dec['class_min_confidence']:.3f}, else make >= "
                   f"{dec['make_min_confidence']:.3f}): class {dec['class']['share']:.1%} of "
                   f"photos (accuracy {dec['class']['accuracy']}), make {dec['make']['share']:.1%} "
                   f"(accuracy {dec['make']['accuracy']}), not sure {dec['not_sure']['share']:.1%}")
    fast = im.get('fast')
    if fast:
      lines.append(f"    fast file (1 view): top-1 {fast['top1_accuracy']:.4f} top-5 "
                   f"{fast['top5_accuracy']:.4f} ({fast['top1_vs_multi_view']:+.4f} vs the "
                   f"multi-view file): " + (
                       'below the floors, not shipped' if not fast['passes_floors'] else
                       'passes the floors, shipped beside model.tflite' if s.get('pushed_to') else
                       'passes the floors (nothing was pushed)'))
    if s.get('report'):
      lines.append(f"    report: {s['report']}")
  if s.get('metrics'):
    lines.append('  float SavedModel (TFMA Evaluator):')
  for name, m in (s.get('metrics') or {}).items():
    val = 'n/a' if m['value'] is None else f"{m['value']:.6f}"
    lines.append(f"    {name:<26} {val:>9}  threshold >= {m['threshold']:.2f}  "
                 f"{'PASS' if m['pass'] else 'FAIL'}")
  lines.append('verdict: ' + ('BLESSED' if s['blessed'] else 'NOT BLESSED'))
  lines.append('pushed model: ' + (s['pushed_to'] or 'nothing pushed' + (
      f" ({s['not_pushed_reason']} did not bless)" if s.get('not_pushed_reason') else '')))
  if s.get('pushed_to'):
    lines.append('  files: model.tflite (int8, metadata + labels), model_fp16.tflite, labels.txt, '
                 'serve.json, seen_ads.json, warm_start.npz, model_card.json, report.html, '
                 'saved_model/')
  lines.append('=' * 66)
  lines += next_steps(s)
  return '\n'.join(lines)


def next_steps(s: Dict[str, Any]) -> List[str]:
  """Where things are and what to try next (the commands as a user types them)."""
  model = s.get('pushed_to')
  sample = sorted(glob.glob(os.path.join(SAMPLE_DIR, 'images', '*.jpg')))
  photo = os.path.relpath(sample[0], REPO_ROOT) if sample else 'PHOTO.jpg'
  out = ['next:']
  if model:
    out.append(f'  bin/carvision predict --model {model} {photo}   # answers for photos or folders')
    out.append(f'  bin/carvision evaluate --model {model} --data DIR --split test   # on labelled photos')
  else:
    out.append('  see why in the report above; the shipped model answers meanwhile:')
    out.append(f'  bin/carvision predict {photo}')
  out.append('  bin/carvision run --config car_ads --data ../shared/data/car_ads   # the 196-class '
             'production recipe (about 75 min on 2 AVX-512 cores; a stop resumes)')
  return out

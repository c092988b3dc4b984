"""Executor of TFLiteEvaluator: the deploy gate, judged on the int8 TFLite that ships.

On the test split (split by ad, never seen by the Trainer) it runs, photo by photo, the candidate's int8
`model.tflite` (through LiteRT, as a phone does) and its float SavedModel; blessed
only when the int8 model clears every floor in config, drops at most
`max_int8_drop` top-1 against the float model (parity), and does not regress more
than `max_regression` against the latest blessed model's int8 TFLite on the same
photos. Writes metrics.json + report.html/png to the evaluation artifact.
"""
import json
import os
from typing import Any, Dict, List, Optional

import apache_beam as beam
import numpy as np
import tensorflow as tf
from absl import logging
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from carvision.components import features as F
from carvision.components import names
from carvision.components import report
from carvision.components import scoring
from carvision.components import serving

BLESSED_FILE, NOT_BLESSED_FILE = 'BLESSED', 'NOT_BLESSED'
METRICS_FILE = names.METRICS_JSON


class _Predict(beam.DoFn):
  """Per worker: candidate int8 + float, baseline int8; one small record per photo."""

  def __init__(self, candidate_dir: str, baseline_dir: str):
    self.candidate_dir, self.baseline_dir = candidate_dir, baseline_dir

  def setup(self):
    self.int8 = serving.TFLiteModel(os.path.join(self.candidate_dir, names.TFLITE_DIR, names.INT8))
    self.float = serving.SavedModel(self.candidate_dir)
    fast = os.path.join(self.candidate_dir, names.TFLITE_DIR, names.FAST)
    self.fast = serving.TFLiteModel(fast) if tf.io.gfile.exists(fast) else None
    self.base = None
    if self.baseline_dir:
      self.base = serving.TFLiteModel(
          os.path.join(self.baseline_dir, names.TFLITE_DIR, names.INT8))

  def process(self, batch: List[bytes]):
    rows = [tf.train.Example.FromString(b).features.feature for b in batch]
    jpegs = [f[F.IMAGE].bytes_list.value[0] for f in rows]
    pixels = {}  # each photo decoded once per input size, for every TFLite file

    def run(m):
      if m.size not in pixels:
        pixels[m.size] = np.stack([serving.pixels(j, m.size) for j in jpegs])
      return m.predict_pixels(pixels[m.size])

    q = run(self.int8)
    fl = self.float.predict_jpegs(jpegs)  # the SavedModel decodes in its own graph
    b = run(self.base) if self.base else None
    fast = run(self.fast) if self.fast else None
    for i, f in enumerate(rows):
      rec = {'class': f[F.raw_label('class')].bytes_list.value[0].decode(),
             'ad_id': int(f[F.AD_ID].int64_list.value[0]),
             'int8': np.round(q[i], 6).tolist(), 'float_top5': np.argsort(-fl[i])[:5].tolist()}
      if b is not None:
        rec['baseline_top1'] = self.base.labels[int(np.argmax(b[i]))]
      if fast is not None:
        rec['fast'] = np.round(fast[i], 6).tolist()
      yield rec


SEEN_TEST_ADS = 'seen_test_ads'  # a check: test ads the model trained on or was chosen on


def judge(records: List[Dict], labels: List[str], gate: Dict[str, Any],
          has_baseline: bool, answers: Optional[Dict] = None,
          seen: Optional[Dict[str, set]] = None) -> Dict[str, Any]:
  """Metrics of the int8 model, float parity, baseline comparison, the optional per-make
  floor -> checks and verdict. `answers`: the model's decision thresholds (serve.json);
  `seen`: its seen_ads.json (a warm start's inherited ads included): a test ad in it fails."""
  truth = [r['class'] for r in records]
  probs = np.array([r['int8'] for r in records], np.float32).reshape(len(records), len(labels))
  m = scoring.score(probs, labels, truth, groups=[r['ad_id'] for r in records], answers=answers)
  index = {l: i for i, l in enumerate(labels)}
  float_top1 = float(np.mean([r['float_top5'][0] == index.get(r['class'], -1) for r in records]))
  float_top5 = float(np.mean([index.get(r['class'], -1) in r['float_top5'] for r in records]))
  m['float'] = {'top1_accuracy': float_top1, 'top5_accuracy': float_top5}
  if records and 'fast' in records[0]:
    # The single-view file: its own figures on the same photos and the same floors; the
    # Pusher ships it only when it passes them (it does not decide the main verdict).
    fp = np.array([r['fast'] for r in records], np.float32).reshape(len(records), len(labels))
    fm = scoring.score(fp, labels, truth, groups=[r['ad_id'] for r in records])
    fast_checks = scoring.verdicts(fm, {'top1_accuracy': gate['top1_min'],
                                        'top5_accuracy': gate['top5_min']})
    m['fast'] = {**{k: fm[k] for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                       'make_accuracy', 'ece', 'per_ad')},
                 'top1_vs_multi_view': fm['top1_accuracy'] - m['top1_accuracy'],
                 'checks': fast_checks,
                 'passes_floors': all(c['pass'] for c in fast_checks.values())}
  checks = scoring.verdicts(m, {'top1_accuracy': gate['top1_min'],
                                'top5_accuracy': gate['top5_min']})
  drop = float_top1 - m['top1_accuracy']
  checks['int8_vs_float_top1_drop'] = {
      'value': drop, 'threshold': gate['max_int8_drop'], 'pass': drop <= gate['max_int8_drop'] + 1e-9,
      'detail': f"float {float_top1:.4f} vs int8 {m['top1_accuracy']:.4f}"}
  per_make = scoring.make_check(m, gate.get('min_make_top1'), int(gate.get('min_make_photos') or 20))
  if per_make is not None:
    checks['min_make_top1'] = per_make
  if has_baseline:
    base_top1 = float(np.mean([r['baseline_top1'] == r['class'] for r in records]))
    change = m['top1_accuracy'] - base_top1
    m['baseline'] = {'top1_accuracy': base_top1}
    checks['top1_change_vs_blessed'] = {
        'value': change, 'threshold': -gate['max_regression'],
        'pass': change >= -gate['max_regression'] - 1e-9,
        'detail': f"blessed {base_top1:.4f} -> candidate {m['top1_accuracy']:.4f}"}
  if seen is not None:
    seen_ids = serving.all_seen(seen)
    test_ads = {r['ad_id'] for r in records}
    hit = sorted(test_ads & seen_ids)
    checks[SEEN_TEST_ADS] = {
        'value': len(hit), 'threshold': 0, 'pass': not hit,
        'detail': (f'{len(hit)} of {len(test_ads)} test ads trained or chose this model or '
                   f'the model it was warm-started from (e.g. ad {hit[0]}): the figures would '
                   'not be on unseen photos' if hit else
                   f'none of the {len(test_ads)} test ads in its seen_ads.json')}
  return {'metrics': m, 'checks': checks, 'blessed': all(c['pass'] for c in checks.values())}


GATE_KEYS = ('top1_min', 'top5_min', 'max_regression', 'max_int8_drop')  # + optional per-make keys


def check_inputs(gate: Dict[str, Any], split: str, candidate: str, examples_uri: str) -> None:
  """Before any work: the gate's floors are numbers, the split has examples, the candidate
  has its int8 file and labels (a wrong wiring fails here with what is missing)."""
  missing = [k for k in GATE_KEYS if not isinstance(gate.get(k), (int, float))
             or isinstance(gate.get(k), bool)]
  if missing:
    raise ValueError(f'TFLiteEvaluator gate_config: {missing} must be numbers (got {gate})')
  if not tf.io.gfile.glob(os.path.join(examples_uri, f'Split-{split}', '*')):
    raise ValueError(f'TFLiteEvaluator: no examples in split {split!r} of {examples_uri}')
  for name in (names.INT8, names.LABELS):
    if not tf.io.gfile.exists(os.path.join(candidate, names.TFLITE_DIR, name)):
      raise ValueError(f'TFLiteEvaluator: the candidate {candidate} has no '
                       f'{names.TFLITE_DIR}/{name} (not a carvision Trainer output?)')


class Executor(base_beam_executor.BaseBeamExecutor):

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    gate = json.loads(exec_properties['gate_config'])
    split = exec_properties.get('split') or 'test'
    examples = artifact_utils.get_single_instance(input_dict['examples'])
    model = artifact_utils.get_single_instance(input_dict['model'])
    candidate = os.path.join(model.uri, names.SERVING_DIR)
    check_inputs(gate, split, candidate, examples.uri)
    baseline = None
    if input_dict.get('baseline_model'):
      base_art = input_dict['baseline_model'][0]
      baseline = os.path.join(base_art.uri, names.SERVING_DIR)
      if not tf.io.gfile.exists(os.path.join(baseline, names.TFLITE_DIR, names.INT8)):
        logging.warning('baseline %s has no int8 TFLite; judged without it', baseline)
        baseline = None
    evaluation = artifact_utils.get_single_instance(output_dict['evaluation'])
    blessing = artifact_utils.get_single_instance(output_dict['blessing'])
    pattern = os.path.join(examples.uri, f'Split-{split}', '*')
    out_uri = evaluation.uri
    with self._make_beam_pipeline() as p:
      _ = (p
           | 'ReadEval' >> beam.io.ReadFromTFRecord(pattern, compression_type=beam.io.filesystem.CompressionTypes.GZIP)
           | 'Batch' >> beam.BatchElements(min_batch_size=8, max_batch_size=32)
           | 'Predict' >> beam.ParDo(_Predict(candidate, baseline))
           | 'All' >> beam.combiners.ToList()
           | 'Write' >> beam.Map(lambda recs: _write(recs, out_uri)))
    with tf.io.gfile.GFile(os.path.join(out_uri, '_records.json')) as f:
      records = json.load(f)
    tf.io.gfile.remove(os.path.join(out_uri, '_records.json'))
    labels = serving.read_labels(os.path.join(candidate, names.TFLITE_DIR, names.LABELS))
    answers = scoring.thresholds(None, serving.read_serve(os.path.join(candidate, names.TFLITE_DIR)))
    seen = serving.seen_ads_of(os.path.join(candidate, names.TFLITE_DIR))
    result = judge(records, labels, gate, baseline is not None, answers, seen)
    result.update(split=split, model=candidate, baseline=baseline, gate=gate)
    with tf.io.gfile.GFile(os.path.join(out_uri, METRICS_FILE), 'w') as f:
      json.dump(result, f, indent=1)
    report.write_report(out_uri, f'int8 TFLite on the {split} split', result['metrics'],
                         result['checks'])
    evaluation.set_string_custom_property('metrics', json.dumps(
        {k: result['metrics'][k] for k in ('top1_accuracy', 'top5_accuracy', 'make_accuracy')}))
    name = BLESSED_FILE if result['blessed'] else NOT_BLESSED_FILE
    with tf.io.gfile.GFile(os.path.join(blessing.uri, name), 'w') as f:
      f.write(json.dumps(result['checks'], indent=1))
    blessing.set_int_custom_property('blessed', int(result['blessed']))
    blessing.set_string_custom_property('current_model', model.uri)
    blessing.set_int_custom_property('current_model_id', model.id)
    for k, c in result['checks'].items():
      logging.info('TFLite gate %s: %s (threshold %s) %s', k, c['value'], c['threshold'],
                   'PASS' if c['pass'] else 'FAIL')


def _write(records, out_uri):
  tf.io.gfile.makedirs(out_uri)
  with tf.io.gfile.GFile(os.path.join(out_uri, '_records.json'), 'w') as f:
    json.dump(records, f)

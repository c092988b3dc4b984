"""Re-chooses a pushed model's decision thresholds (serve.json) on the validation split with
the code of today, and judges them on the test split as the deploy gate does.

  scripts/env.sh run 'python scripts/rederive_serve.py --root runs/car_ads [--write]'

For a model pushed before a fix of decision.choose_thresholds. From the pipeline root that made
it: the ExampleGen's validation and test records and the Trainer's serving directory (its int8
file must be the shipped one). The int8 file (what phones run) answers both splits through the
TFLiteEvaluator's own code; the thresholds are chosen on validation as the Trainer chooses them
(components/trainer/calibrate), the test split only reports them. `--write` replaces the
shipped serve.json, the card's decision record and test figures, and the report, each through
a temporary file; without it one JSON line is all. The re-judged test top-1 must equal the
card's (the same file on the same photos), else nothing is written.
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from carvision.components import names, report, serving  # noqa: E402
from carvision.components.tflite_evaluator import executor  # noqa: E402
from carvision.components.trainer import calibrate  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402
from carvision.pipeline import run as run_lib  # noqa: E402


def _latest(root, pattern):
  found = sorted(glob.glob(os.path.join(root, pattern)), key=os.path.getmtime)
  if not found:
    raise SystemExit(f'error: nothing matches {pattern} under {root}')
  return found[-1]


def _records(examples, split, candidate):
  """The TFLiteEvaluator's per-photo records of `candidate` on one split."""
  pred = executor._Predict(candidate, '')  # pylint: disable=protected-access
  pred.setup()
  data = tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(examples, f'Split-{split}', '*')),
                                 compression_type='GZIP')
  out, batch = [], []
  for raw in data.as_numpy_iterator():
    batch.append(raw)
    if len(batch) == 32:
      out += list(pred.process(batch))
      batch = []
  if batch:
    out += list(pred.process(batch))
  return out


def _write_json(path, obj):
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _file_record(path):
  with open(path, 'rb') as f:
    data = f.read()
  return {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--root', required=True, help="the pipeline root that made the model")
  ap.add_argument('--model', default=os.path.join(config_lib.REPO_ROOT, 'models', 'car_ads'))
  ap.add_argument('--config', default='car_ads')
  ap.add_argument('--write', action='store_true')
  a = ap.parse_args()
  cfg = config_lib.load(a.config)
  examples = _latest(a.root, 'CarAdsExampleGen/examples/*')
  candidate = os.path.join(_latest(a.root, 'Trainer/model/*'), names.SERVING_DIR)
  tfl = os.path.join(candidate, names.TFLITE_DIR)
  if _file_record(os.path.join(tfl, names.INT8)) != _file_record(os.path.join(a.model, names.INT8)):
    raise SystemExit(f'error: {candidate} is not the model shipped in {a.model}')
  labels = serving.read_labels(os.path.join(tfl, names.LABELS))
  index = {l: i for i, l in enumerate(labels)}

  val = _records(examples, 'validation', candidate)
  pv = np.array([r['int8'] for r in val], np.float64)
  yv = np.array([index.get(r['class'], -1) for r in val])
  serve = calibrate.serve_thresholds(cfg.serve, pv, yv, labels)
  serve['chosen_with'] = {
      'file': names.INT8, 'by': 'scripts/rederive_serve.py', 'code_version': run_lib.code_version(),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}

  ev = cfg.evaluate
  gate = {'top1_min': ev.top1_min, 'top5_min': ev.top5_min, 'max_regression': ev.max_regression,
          'max_int8_drop': ev.max_int8_drop, 'min_make_top1': ev.min_make_top1,
          'min_make_photos': ev.min_make_photos}
  test = _records(examples, 'test', candidate)
  result = executor.judge(test, labels, gate, False, serve, serving.seen_ads_of(tfl))
  metrics = result['metrics']
  card_path = os.path.join(a.model, names.MODEL_CARD)
  with open(card_path, encoding='utf-8') as f:
    card = json.load(f)
  shipped = card['metrics']['test']['int8_tflite']
  same = abs(metrics['top1_accuracy'] - shipped['top1_accuracy']) < 1e-9
  print(json.dumps({'model': a.model, 'candidate': candidate, 'serve': serve,
                    'test_photos': metrics['examples'], 'test_top1': metrics['top1_accuracy'],
                    'card_test_top1': shipped['top1_accuracy'], 'reproduces_card': same,
                    'test_decision_before': shipped['answers'].get('decision'),
                    'test_decision_after': metrics['answers'].get('decision'),
                    'test_per_ad_decision_after': metrics['per_ad']['answers'].get('decision')}))
  if not a.write:
    return 0
  if not same:
    print("error: the test top-1 differs from the card's; nothing written", file=sys.stderr)
    return 1
  shipped['answers'] = metrics['answers']
  shipped['per_ad']['answers'] = metrics['per_ad']['answers']
  card['decision'] = serve
  _write_json(os.path.join(a.model, names.SERVE), serve)
  with tempfile.TemporaryDirectory(dir=a.model) as tmp:
    files = report.write_report(tmp, 'int8 TFLite on the test split', metrics, result['checks'])
    for path in files:
      os.replace(path, os.path.join(a.model, os.path.basename(path)))
  for name in [names.SERVE] + [os.path.basename(p) for p in files]:
    record = _file_record(os.path.join(a.model, name))
    for key in ('files', 'pushed_files'):
      if name in card.get(key, {}):
        card[key][name] = {**card[key][name], **record}
  _write_json(card_path, card)
  return 0


if __name__ == '__main__':
  sys.exit(main())

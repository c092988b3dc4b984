"""Calibration of a model as it ships: top-1 confidence vs accuracy on a car_ads-format data
set, with a temperature fitted on the validation split and judged on the test split.

  bin/carvision ... or: scripts/env.sh run 'python bench/calibration.py --data ../shared/data/car_ads'

The model (default models/car_ads, its int8 model.tflite) answers every usable photo of the
validation and test ads (the pipeline's split by ad_id, `--config`'s ingest.splits); the
temperature T minimising validation NLL is applied to the test log-probabilities. Prints
one JSON line: ECE (15 bins) and top-1 on test before/after, T, reliability diagrams.

Two more figures say how far a better calibrator could go. The floor: the ECE a perfectly
calibrated model with the test confidences would score on this many photos (labels drawn
right with probability = confidence; ECE's binned estimate is biased upward on a few
hundred photos a bin). And a calibrator with two numbers instead of one: Platt scaling of
the top-1 confidence (sigmoid(a logit(c) + b), fitted on validation by log loss on right /
wrong), which can lower the top bins and raise the middle ones where one temperature moves
all of them the same way.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from carvision.components import calibration, evaluation, serving  # noqa: E402
from carvision.components.example_gen import records  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402


def _answers(model, rows, data_dir, max_pixels):
  """Probabilities and class indices of the usable photos of classes the model knows."""
  probs, usable, _ = evaluation.predict_folder(model, data_dir, rows, max_pixels)
  index = {l: i for i, l in enumerate(model.labels)}
  keep = [i for i, r in enumerate(usable) if evaluation.truth(r) in index]
  return probs[keep], np.array([index[evaluation.truth(usable[i])] for i in keep])


def ece_floor(probs):
  """Mean, median and 90th percentile of a perfectly calibrated model's ECE here."""
  sims = calibration.perfect_calibration_eces(probs, draws=2000)
  return {'mean': round(float(sims.mean()), 4), 'median': round(float(np.median(sims)), 4),
          'p90': round(float(np.quantile(sims, 0.9)), 4)}


def _logit(c):
  c = np.clip(c, 1e-6, 1 - 1e-6)
  return np.log(c / (1 - c))


def fit_top1_platt(probs, labels):
  """(a, b) minimising the log loss of sigmoid(a logit(top-1 confidence) + b) on right/wrong."""
  from scipy.optimize import minimize  # pylint: disable=g-import-not-at-top
  z, right = _logit(probs.max(1)), probs.argmax(1) == labels

  def loss(x):
    c = np.clip(1 / (1 + np.exp(-(x[0] * z + x[1]))), 1e-9, 1 - 1e-9)
    return -float(np.mean(np.where(right, np.log(c), np.log(1 - c))))

  return tuple(float(v) for v in minimize(loss, [1.0, 0.0], method='Nelder-Mead').x)


def apply_top1_platt(probs, a, b):
  """The top-1 answer keeps its place (at least the runner-up's probability); the others share
  the rest in their old proportions."""
  top, c = probs.argmax(1), probs.max(1)
  second = np.sort(probs, 1)[:, -2]
  new = np.maximum(1 / (1 + np.exp(-(a * _logit(c) + b))), second)
  out = probs * ((1 - new) / np.maximum(1 - c, 1e-12))[:, None]
  out[np.arange(len(probs)), top] = new
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--data', required=True)
  ap.add_argument('--model', default=os.path.join(config_lib.REPO_ROOT, 'models', 'car_ads'))
  ap.add_argument('--config', default='car_ads')
  ap.add_argument('--fit-on', default='validation', choices=['validation', 'half-of-test'],
                  help='half-of-test: fit on half the test ads, judge on the other half (for a '
                       'model trained before three splits, whose training saw the validation ads)')
  a = ap.parse_args()
  cfg = config_lib.load(a.config)
  model = serving.load(a.model)
  rows = evaluation.read_labels(a.data)
  by_split = {s: evaluation.in_split(rows, s, cfg.ingest.splits) for s in ('validation', 'test')}
  if a.fit_on == 'half-of-test':
    half = lambda r: records.split_for(int(r['ad_id']), {'fit': 1, 'judge': 1})  # noqa: E731
    by_split = {'validation': [r for r in by_split['test'] if half(r) == 'fit'],
                'test': [r for r in by_split['test'] if half(r) == 'judge']}
  t0 = time.time()
  pv, yv = _answers(model, by_split['validation'], a.data, cfg.ingest.max_pixels)
  pt, yt = _answers(model, by_split['test'], a.data, cfg.ingest.max_pixels)
  fit = calibration.temperature_for(pv, yv)
  logits = np.log(np.clip(pt, 1e-12, 1.0))
  after = calibration.softmax(logits / fit['temperature'])
  a_, b_ = fit_top1_platt(pv, yv)
  platt_v, platt_t = apply_top1_platt(pv, a_, b_), apply_top1_platt(pt, a_, b_)
  out = {'model': getattr(model, 'path', a.model), 'data': a.data, 'fit_on': a.fit_on,
         'validation_photos': int(len(yv)), 'test_photos': int(len(yt)),
         'temperature': round(fit['temperature'], 4),
         'validation_ece_before': round(fit['ece_before'], 4),
         'validation_ece_after': round(fit['ece_after'], 4),
         'test_top1': round(float((pt.argmax(1) == yt).mean()), 4),
         'test_ece_before': round(calibration.ece(pt, yt), 4),
         'test_ece_after': round(calibration.ece(after, yt), 4),
         'test_top1_after': round(float((after.argmax(1) == yt).mean()), 4),
         'test_ece_floor': ece_floor(pt),
         'reliability_test_before': calibration.reliability(pt, yt),
         'reliability_test_after': calibration.reliability(after, yt),
         'top1_platt': {'a': round(a_, 4), 'b': round(b_, 4),
                        'validation_ece': round(calibration.ece(platt_v, yv), 4),
                        'test_ece': round(calibration.ece(platt_t, yt), 4),
                        'test_top1': round(float((platt_t.argmax(1) == yt).mean()), 4)},
         'seconds': round(time.time() - t0, 1)}
  print(json.dumps(out))


if __name__ == '__main__':
  main()

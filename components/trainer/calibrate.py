"""After training: temperatures fitted on the validation split and baked into the heads, and
the class / make / not-sure thresholds of the decision chosen there."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components import calibration
from carvision.components import decision
from carvision.components.trainer import model as M


def bake_temperature(head: keras.Model, temperatures: Dict[str, float]) -> None:
  """softmax((xW + b) / T) == softmax(x (W / T) + b / T): the calibration lives in the weights,
  so every exported file returns calibrated probabilities."""
  for name, t in temperatures.items():
    layer = head.get_layer(name)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / t, bias / t])


def validation_probabilities(full: keras.Model, ds: tf.data.Dataset, views):
  """({head: probabilities}, {head: true index}) of `full` on `ds`, as the exported model
  answers (test-time views included)."""
  probs = {M.CLASS_OUT: [], M.MAKE_OUT: []}
  truth = {M.CLASS_OUT: [], M.MAKE_OUT: []}
  for x, y in ds:
    out = M.predict_views(full, x, views)
    for k in probs:
      probs[k].append(out[k].numpy())
      truth[k].append(np.argmax(y[k].numpy(), -1))
  return ({k: np.concatenate(v) for k, v in probs.items()},
          {k: np.concatenate(v) for k, v in truth.items()})


def calibrate(full: keras.Model, probs: Dict, truth: Dict) -> Dict:
  """Fits a temperature per head on the validation split's probabilities and bakes it in;
  returns T, the validation ECE before/after, and the calibrated probabilities."""
  record = {k: calibration.temperature_for(probs[k], truth[k]) for k in probs}
  bake_temperature(full.get_layer('heads'), {k: r['temperature'] for k, r in record.items()})
  # the baked model's answers, without a second pass
  calibrated = {k: calibration.at_temperature(p, record[k]['temperature'])
                for k, p in probs.items()}
  return {'split': 'validation', **record}, calibrated


def serve_thresholds(serve_cfg, probs: np.ndarray, truth: np.ndarray,
                     labels: List[str]) -> Dict:
  """The class / make thresholds of the decision: configured numbers, else chosen on the
  validation split for `serve.target_precision` (components/decision); `serve_cfg`: the typed
  components.trainer.config.ServeConfig."""
  target = float(serve_cfg.target_precision)
  fixed_class = serve_cfg.class_min_confidence
  chosen = decision.choose_thresholds(probs, labels, truth, target,
                                      None if fixed_class is None else float(fixed_class))
  out = {'target_precision': target, 'validation_photos': chosen['photos'],
         'validation_photos_below_class_min': chosen['photos_below_class_min'], 'chosen_on': {}}
  for key in ('class_min_confidence', 'make_min_confidence'):
    fixed = getattr(serve_cfg, key)
    out[key] = float(fixed) if fixed is not None else chosen[key]
    out['chosen_on'][key] = 'config' if fixed is not None else 'validation'
  out['validation'] = decision.evaluate(probs, labels, truth, out['class_min_confidence'],
                                        out['make_min_confidence'], target).get('decision')
  return out

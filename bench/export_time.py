"""Where the Trainer's TFLite export spends its time, on a model a pipeline run trained.

  scripts/env.sh run 'python bench/export_time.py --root runs/demo [--size 260] [--samples 100]'

Runs the Trainer's own `export.to_tflite` on the latest Trainer model and Transform output
under `--root` (a pipeline root), for: the served views with layer ranking and the fp16 file
(what a production export does), one view (the fast file), the served views without the
ranking; prints the converter/calibration, ranking and total seconds of each as JSON lines.
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402

from carvision.components.trainer import export  # noqa: E402


def _latest(pattern):
  """The match with the highest execution id (<root>/<component>/<output>/<id>/...)."""
  def exec_id(path):
    part = os.path.relpath(path, os.path.dirname(pattern.split('*')[0])).split(os.sep)[0]
    return int(part) if part.isdigit() else -1
  found = sorted(glob.glob(pattern), key=exec_id)
  if not found:
    sys.exit(f'nothing matches {pattern}')
  return found[-1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--root', required=True, help='a pipeline root (runs/demo, runs/car_ads, ...)')
  ap.add_argument('--size', type=int, default=260)
  ap.add_argument('--samples', type=int, default=100, help='calibration photos')
  ap.add_argument('--float-layers', type=int, default=5)
  a = ap.parse_args()
  model_dir = _latest(os.path.join(a.root, 'Trainer', 'model', '*', 'Format-Serving'))
  examples = _latest(os.path.join(a.root, 'Transform', 'transformed_examples', '*'))
  graph = _latest(os.path.join(a.root, 'Transform', 'transform_graph', '*'))
  full = keras.models.load_model(model_dir, compile=False)
  spec = tft.TFTransformOutput(graph).transformed_feature_spec()
  rep = export.representative_pixels([os.path.join(examples, 'Split-train', '*')], spec, a.size,
                                     a.samples)
  debug = export.representative_pixels([os.path.join(examples, 'Split-validation', '*')], spec,
                                       a.size, export.DEBUG_SAMPLES)
  timings = {}
  base = tf.lite.experimental.QuantizationDebugger

  class Timed(base):  # the converter and calibration run in __init__, the ranking in run()
    def __init__(self, *args, **kw):
      t = time.time()
      super().__init__(*args, **kw)
      timings['convert_and_calibrate_s'] = round(time.time() - t, 1)

    def run(self):
      t = time.time()
      super().run()
      timings['rank_float_layers_s'] = round(time.time() - t, 1)

  tf.lite.experimental.QuantizationDebugger = Timed
  served = ['full', 'flip', 'crop:0.875']
  for views, layers, fp16 in ((served, a.float_layers, True), (['full'], a.float_layers, False),
                              (served, 0, False)):
    timings.clear()
    t = time.time()
    export.to_tflite(full, a.size, rep, views, float_layers=layers, debug=debug, fp16=fp16)
    print(json.dumps({'views': views, 'float_layers': layers, 'fp16': fp16, **timings,
                      'total_s': round(time.time() - t, 1), 'calibration_photos': len(rep),
                      'model': model_dir}), flush=True)


if __name__ == '__main__':
  main()

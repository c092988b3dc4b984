"""Latency of the fast (one view) int8 file against the multi-view one and the float model.

  scripts/env.sh run 'python bench/fast_file.py [--classes 196] [--photos 40]'

Builds the production network (configs/default.yaml: backbone, image size, serving views,
layers kept float) with the converted ImageNet weights and a head of --classes outputs,
exports it with the Trainer's own `export.to_tflite` (multi-view and single-view int8), and
times one photo per call: LiteRT with 1 and 2 threads, and the float Keras model of the same
views (tf.function, batch 1). Latency does not depend on what the head learned, so no
training is needed; accuracy of the fast file is the int8 gate's job (model card).
"""
import argparse
import glob
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from carvision.components import serving  # noqa: E402
from carvision.components.example_gen import records  # noqa: E402
from carvision.components.trainer import export  # noqa: E402
from carvision.components.trainer import model as M  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402

TINY = os.path.join(config_lib.SAMPLE_DIR, 'images')


def _median_ms(fn, inputs):
  for x in inputs[:3]:
    fn(x)
  times = []
  for x in inputs:
    t = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t)
  return round(float(np.median(times)) * 1000, 1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--classes', type=int, default=196)
  ap.add_argument('--makes', type=int, default=49)
  ap.add_argument('--photos', type=int, default=40)
  args = ap.parse_args()
  cfg = config_lib.load('default')
  mc = cfg.model
  size, views = mc.image_size, M.parse_views(mc.serving_views)
  jpegs = []
  for path in sorted(glob.glob(os.path.join(TINY, '*.jpg'))):
    data = open(path, 'rb').read()
    if records.validate_image(data, cfg.ingest.max_pixels)[0] is None:
      jpegs.append(data)
  pix = np.stack([serving.pixels(j, size) for j in jpegs[:args.photos]])
  base = M.backbone(mc.backbone, 'imagenet', size)
  full = M.classifier(base, M.heads(int(base.output.shape[-1]), args.classes, args.makes, 0.0),
                      size)
  out = {'machine': platform.machine(), 'cpus': os.cpu_count(), 'backbone': mc.backbone,
         'image_size': size, 'views': views, 'photos': len(pix)}
  files = {}
  files['multi_view'], _, _ = export.to_tflite(full, size, pix, views, mc.tflite_float_layers,
                                               fp16=False)
  files['fast'], _, _ = export.to_tflite(full, size, pix, ['full'], mc.tflite_float_layers,
                                         fp16=False)
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  for name, blob in files.items():
    out[f'{name}_bytes'] = len(blob)
    for threads in (1, 2):
      it = Interpreter(model_content=blob, num_threads=threads)
      it.allocate_tensors()
      inp = it.get_input_details()[0]['index']

      def run(x, it=it, inp=inp):
        it.set_tensor(inp, x[None])
        it.invoke()
      out[f'{name}_int8_ms_{threads}_thread'] = _median_ms(run, list(pix))
  for name, v in (('multi_view', views), ('fast', ['full'])):
    f = tf.function(lambda x, v=v: M.predict_views(full, x, v)[M.CLASS_OUT])
    out[f'{name}_float_keras_ms'] = _median_ms(lambda x, f=f: f(x[None]).numpy(), list(pix))
  out['fast_vs_float_same_view_speedup_1_thread'] = round(
      out['fast_float_keras_ms'] / out['fast_int8_ms_1_thread'], 2)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

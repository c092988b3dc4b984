"""CPU latency per photo: LiteRT int8 / fp16 (1 and 2 threads) against the float SavedModel.

  scripts/env.sh run 'python bench/serving.py --model DIR [--photos 200]'

DIR is a pushed version directory (model.tflite, model_fp16.tflite, saved_model/) or a
Trainer serving dir (tflite/ inside). Latency = one photo's model call on decoded uint8
pixels (TFLite) or one JPEG (SavedModel `serving_default`, decoding included), median and
p90 over --photos photos of the embedded sample, after 10 warm-up calls, same process.
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

from carvision.components import names, serving  # noqa: E402
from carvision.components.example_gen import records  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402

TINY = os.path.join(config_lib.SAMPLE_DIR, 'images')


def _find(root, name):
  for cand in (os.path.join(root, name), os.path.join(root, names.TFLITE_DIR, name)):
    if os.path.exists(cand):
      return cand
  raise FileNotFoundError(f'{name} under {root}')


def _stats(times):
  ms = np.array(times) * 1000
  return {'median_ms': round(float(np.median(ms)), 2), 'p90_ms': round(float(np.percentile(ms, 90)), 2)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--model', required=True)
  ap.add_argument('--photos', type=int, default=200)
  args = ap.parse_args()
  jpegs = []
  for path in sorted(glob.glob(os.path.join(TINY, '*.jpg'))):
    data = open(path, 'rb').read()
    if records.validate_image(data, 40_000_000)[0] is None:  # the sample has a corrupt one
      jpegs.append(data)
  jpegs = (jpegs * (args.photos // len(jpegs) + 1))[:args.photos]
  out = {'photos': len(jpegs), 'cpus': os.cpu_count(), 'machine': platform.machine()}
  for kind, name in (('int8', names.INT8), ('fp16', names.FP16)):
    path = _find(args.model, name)
    out[f'{kind}_bytes'] = os.path.getsize(path)
    for threads in (1, 2):
      m = serving.TFLiteModel(path, labels=[], threads=threads)
      pix = [serving.pixels(j, m.size) for j in jpegs]
      for p in pix[:10]:
        m.predict_pixels(p[None])
      times = []
      for p in pix:
        t = time.perf_counter()
        m.predict_pixels(p[None])
        times.append(time.perf_counter() - t)
      out[f'litert_{kind}_{threads}_threads'] = _stats(times)
  saved = os.path.join(args.model, 'saved_model') if os.path.isdir(
      os.path.join(args.model, 'saved_model')) else args.model
  sm = serving.SavedModel(saved)
  for j in jpegs[:10]:
    sm.predict_jpegs([j])
  times = []
  for j in jpegs:
    t = time.perf_counter()
    sm.predict_jpegs([j])
    times.append(time.perf_counter() - t)
  out['savedmodel_float_jpeg_in'] = _stats(times)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

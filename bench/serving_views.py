"""Test-time views and selective int8 quantisation, measured on one trained model's weights
(same validation split, photos decoded once): float top-1/top-5 per view set, int8 TFLite top-1/top-5
and its drop against float by number of layers kept float, LiteRT latency of each int8 file.

  scripts/env.sh run "python bench/serving_views.py --model runs/warm/run6/Format-Serving \
      --transform-graph runs/car_ads/Transform/transform_graph/49 \
      --examples runs/car_ads/Transform/transformed_examples/49 --size 300 \
      --view-sets 'full;full,flip;full,flip,crop:0.875' --float-layers 0,5"
"""
import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402

from carvision.components import features as F  # noqa: E402
from carvision.components.trainer import export  # noqa: E402
from carvision.components.trainer import model as M  # noqa: E402
from carvision.components.trainer import data  # noqa: E402


def accuracy(p, y):
  order = np.argsort(-p, axis=1, kind='stable')
  return {'top1': round(float(np.mean(order[:, 0] == y)), 4),
          'top5': round(float(np.mean([y[i] in order[i, :5] for i in range(len(y))])), 4)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', required=True, help="a Trainer output's Format-Serving")
  ap.add_argument('--transform-graph', required=True)
  ap.add_argument('--examples', required=True, help='transformed examples (Split-validation/, Split-train/)')
  ap.add_argument('--backbone', default='efficientnet_lite2')
  ap.add_argument('--size', type=int, default=300)
  ap.add_argument('--view-sets', default='full;full,flip;full,flip,crop:0.875')
  ap.add_argument('--float-layers', default='0,5')
  ap.add_argument('--calibration', type=int, default=400)
  a = ap.parse_args()
  out = tft.TFTransformOutput(a.transform_graph)
  nc = out.vocabulary_size_by_name(F.vocab_name('class'))
  nm = out.vocabulary_size_by_name(F.vocab_name('make'))
  spec = out.transformed_feature_spec()
  files = sorted(glob.glob(os.path.join(a.examples, 'Split-validation', '*')))
  xs, ys = [], []
  for x, y in data.dataset(files, spec, a.size, 64, nc, nm, training=False):
    xs.append(x.numpy())
    ys.append(np.argmax(y[M.CLASS_OUT].numpy(), axis=1))
  x_eval, y_eval = np.concatenate(xs), np.concatenate(ys)
  base = M.backbone(a.backbone, 'none', a.size)
  full = M.classifier(base, M.heads(int(base.output.shape[-1]), nc, nm, 0.0), a.size)
  full.set_weights(keras.models.load_model(a.model, compile=False).get_weights())
  rep = export.representative_pixels([os.path.join(a.examples, 'Split-train')], spec, a.size,
                                     a.calibration)
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  rows = []
  for views in (v.split(',') for v in a.view_sets.split(';')):
    f = tf.function(lambda x, v=tuple(views): M.predict_views(full, x, v)[M.CLASS_OUT])
    p = np.concatenate([f(x_eval[i:i + 16]).numpy() for i in range(0, len(x_eval), 16)])
    row = {'views': views, 'photos': len(y_eval), 'float': accuracy(p, y_eval)}
    print(json.dumps(row), flush=True)
    for n in (int(k) for k in a.float_layers.split(',')):
      t = time.time()
      int8, _, kept = export.to_tflite(full, a.size, rep, views, float_layers=n)
      conv_s = time.time() - t
      it = Interpreter(model_content=int8, num_threads=1)
      it.allocate_tensors()
      i, o = it.get_input_details()[0], it.get_output_details()[0]
      q, times = [], []
      for img in x_eval:
        t = time.perf_counter()
        it.set_tensor(i['index'], img[None])
        it.invoke()
        times.append(time.perf_counter() - t)
        q.append(it.get_tensor(o['index'])[0].astype(np.float32))
      r = dict(row, float_layers=n, kept=[k['layer'].split(';')[-1] for k in kept],
               int8=accuracy(np.stack(q), y_eval), int8_bytes=len(int8),
               ms_1_thread=round(1000 * float(np.median(times)), 1), convert_s=round(conv_s))
      r['int8_drop_pt'] = round(100 * (r['float']['top1'] - r['int8']['top1']), 2)
      print(json.dumps(r), flush=True)
      rows.append(r)


if __name__ == '__main__':
  main()

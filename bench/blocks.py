"""Throughput of the pieces the trainer runs: frozen backbone forward, and training the top N
blocks on cached activations (no data pipeline, random activations of the right shape).

  scripts/env.sh run 'python bench/blocks.py --examples DIR/Split-train'
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
import tf_keras as keras  # noqa: E402

from carvision.components import features as F  # noqa: E402
from carvision.components.backbone import efficientnet_lite as el  # noqa: E402
from carvision.components import images  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--examples', required=True, help='a Split-train directory of TFRecords')
  ap.add_argument('--variants', default='efficientnet_lite2:260,efficientnet_lite0:224')
  args = ap.parse_args()
  files = sorted(glob.glob(os.path.join(args.examples, '*')))
  spec = {F.IMAGE: tf.io.FixedLenFeature([], tf.string)}
  out = {}
  for item in args.variants.split(','):
    variant, size = item.split(':')
    size = int(size)
    base = el.pretrained(variant, (size, size, 3))
    ds = (tf.data.TFRecordDataset(files, compression_type='GZIP').take(512)
          .map(lambda s: tf.io.parse_single_example(s, spec)[F.IMAGE])
          .map(lambda j, size=size: images.decode_tf(j, size), num_parallel_calls=4).batch(64).prefetch(2))
    f = tf.function(lambda x, base=base: base(el.normalise(x), training=False))
    for x in ds.take(1):
      f(x)
    t, n = time.time(), 0
    for x in ds:
      f(x)
      n += len(x)
    out[f'{variant}_frozen_forward_photos_per_s'] = round(n / (time.time() - t), 1)
    for top in (2, 4, 6):
      lower, upper = el.split(base, variant, top)
      xb = np.random.rand(64, *lower.output.shape[1:]).astype('float32')
      inp = keras.Input(lower.output.shape[1:])
      m = keras.Model(inp, keras.layers.Dense(196, activation='softmax')(upper(inp)))
      m.compile(keras.optimizers.Adam(1e-4), 'sparse_categorical_crossentropy')
      y = np.random.randint(0, 196, 64)
      m.train_on_batch(xb, y)
      t = time.time()
      for _ in range(5):
        m.train_on_batch(xb, y)
      out[f'{variant}_top{top}_train_views_per_s'] = round(320 / (time.time() - t), 1)
      out[f'{variant}_top{top}_activation_shape'] = list(lower.output.shape[1:])
  print(json.dumps(out))


if __name__ == '__main__':
  main()

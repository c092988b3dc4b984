"""End-to-end training speed of EfficientNet-Lite by how many bottom blocks stay frozen, and
with bfloat16 mixed precision: what chose `top_blocks: 14` for the production recipe.
Random pixels, no data pipeline; BatchNormalization frozen as in the trainer.

  scripts/env.sh run 'python bench/trainable.py --size 260 --frozen 0,4,7 --policy float32'
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from carvision.components.backbone import efficientnet_lite as el  # noqa: E402
from carvision.components.trainer import model as M  # noqa: E402


def speed(variant: str, size: int, frozen: int, batch: int, steps: int) -> float:
  base = el.pretrained(variant, (size, size, 3))
  n_blocks = len(el.block_names(base))
  M.set_trainable(base, 'all' if frozen == 0 else 'top_blocks', n_blocks - frozen)
  x = keras.Input((size, size, 3))
  m = keras.Model(x, keras.layers.Dense(196, activation='softmax', dtype='float32')(base(x)))
  m.compile(optimizer=keras.optimizers.Adam(1e-4), loss='sparse_categorical_crossentropy')
  rng = np.random.default_rng(0)
  xs = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  ys = rng.integers(0, 196, batch)
  for _ in range(2):
    m.train_on_batch(xs, ys)
  t = time.time()
  for _ in range(steps):
    m.train_on_batch(xs, ys)
  return steps * batch / (time.time() - t)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--variant', default='efficientnet_lite2')
  ap.add_argument('--size', type=int, default=260)
  ap.add_argument('--frozen', default='0,4,7', help='bottom blocks kept frozen, comma-separated')
  ap.add_argument('--policy', default='float32', help='float32 or mixed_bfloat16')
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--steps', type=int, default=8)
  a = ap.parse_args()
  if a.policy != 'float32':
    keras.mixed_precision.set_global_policy(a.policy)
  for f in (int(v) for v in a.frozen.split(',')):
    print(f'{a.variant} {a.size}px {a.policy} bottom {f} blocks frozen: '
          f'{speed(a.variant, a.size, f, a.batch, a.steps):.1f} photos/s', flush=True)


if __name__ == '__main__':
  main()

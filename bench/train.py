"""Training speed and time-to-accuracy: the configured recipe vs a plain full fine-tune.

  scripts/env.sh run 'python bench/train.py --examples DIR [--classes 40] [--budget-s 300]'

DIR holds ExampleGen output (Split-train/, Split-validation/), e.g. from
`carvision ingest ... --out DIR` (DIR/examples). Both recipes get the same wall-clock
budget on the same photos (the first --classes classes, train split to train, validation
split to score) and start from the same converted ImageNet weights:

  cached: the configured recipe (configs/default.yaml): the frozen lower network runs
          once over `feature_views` views per photo; heads, then the top blocks train on
          the cached activations;
  plain:  every step decodes, augments and runs the whole network forward and backward
          (all layers trainable, BatchNorm frozen), as a straightforward fine-tune does.

Reported: training photos/s (photo-views through the trained part per second), eval
top-1 after the budget, and the time to reach the plain recipe's final top-1.
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from components.trainer import model as M  # noqa: E402
from components.trainer import task  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

SPEC = {'image/encoded': tf.io.FixedLenFeature([], tf.string),
        'label/class': tf.io.FixedLenFeature([], tf.string),
        'label/make': tf.io.FixedLenFeature([], tf.string)}


def load(examples: str, split: str, keep=None):
  files = tf.io.gfile.glob(os.path.join(examples, f'Split-{split}', '*'))
  out = []
  for rec in tf.data.TFRecordDataset(files, compression_type='GZIP'):
    f = tf.io.parse_single_example(rec, SPEC)
    cls = f['label/class'].numpy().decode()
    if keep is None or cls in keep:
      out.append((f['image/encoded'].numpy(), cls, f['label/make'].numpy().decode()))
  return out


def to_ds(rows, classes, makes, size, batch, training):
  jpeg = [r[0] for r in rows]
  y = np.array([classes.index(r[1]) for r in rows])
  ym = np.array([makes.index(r[2]) for r in rows])
  ds = tf.data.Dataset.from_tensor_slices((jpeg, y, ym))
  if training:
    ds = ds.shuffle(len(rows), seed=1, reshuffle_each_iteration=True)
  fn = (lambda j: task.augment(j, size)) if training else (lambda j: task.decode(j, size))
  ds = ds.map(lambda j, a, b: (fn(j), {M.CLASS_OUT: tf.one_hot(a, len(classes)),
                                       M.MAKE_OUT: tf.one_hot(b, len(makes))}),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


class Budget(keras.callbacks.Callback):
  """Stops at the wall-clock budget; records (elapsed, eval top-1) after every epoch."""

  def __init__(self, t0, budget, curve, evaluate):
    super().__init__()
    self.t0, self.budget, self.curve, self.evaluate = t0, budget, curve, evaluate

  def on_epoch_end(self, epoch, logs=None):
    self.curve.append((round(time.time() - self.t0, 1), round(self.evaluate(), 4)))
    if time.time() - self.t0 > self.budget:
      self.model.stop_training = True


def run_cached(mc, train, ev, classes, makes, budget):
  size, batch = int(mc['image_size']), int(mc['batch_size'])
  t0 = time.time()
  base = M.backbone(mc)
  head = M.heads(int(base.output.shape[-1]), len(classes), len(makes), float(mc['dropout']))
  tops = [int(s['top_blocks']) for s in mc['stages'] if s.get('cached')]
  lower, upper = M.el.split(base, mc['backbone'], max(tops))
  views = [to_ds(train, classes, makes, size, 64, False)]
  views += [to_ds(train, classes, makes, size, 64, True) for _ in range(int(mc['feature_views']) - 1)]
  parts = [task.cached_features(lower, v) for v in views]
  xtr = np.concatenate([p[0] for p in parts])
  ytr = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
  xev, yev = task.cached_features(lower, to_ds(ev, classes, makes, size, 64, False))
  cache_s = time.time() - t0
  n_out = {M.CLASS_OUT: len(classes), M.MAKE_OUT: len(makes)}
  inp = keras.Input(xtr.shape[1:])
  top = keras.Model(inp, M.named(head(upper(inp))))

  def evaluate():
    p = top.predict(xev.astype(np.float32), batch_size=256, verbose=0)[M.CLASS_OUT]
    return float((p.argmax(1) == yev[M.CLASS_OUT]).mean())

  curve, seen = [], 0
  for stage in mc['stages']:
    if time.time() - t0 > budget:
      break
    M.set_trainable(upper, 'none' if stage['trainable'] == 'none' else 'top_blocks',
                    int(stage.get('top_blocks', 2)))
    seq = task.ArrayBatches(xtr, ytr, batch, n_out, shuffle=True)
    steps = len(seq) * int(stage['epochs'])
    task._compile(top, M.WarmupCosine(stage['learning_rate'], steps, steps // 10), 0.1)  # pylint: disable=protected-access
    ts = time.time()
    h = top.fit(seq, epochs=int(stage['epochs']), verbose=0,
                callbacks=[Budget(t0, budget, curve, evaluate)])
    seen_stage = len(h.history['loss']) * len(xtr)
    seen += seen_stage
    print(f"cached {stage['name']}: {seen_stage / (time.time() - ts):.1f} views/s", flush=True)
  return {'cache_seconds': round(cache_s, 1), 'cached_views': int(len(xtr)),
          'curve': curve, 'wall_s': round(time.time() - t0, 1),
          'train_views_per_s_after_cache': round(seen / max(1e-9, time.time() - t0 - cache_s), 1),
          'final_top1': curve[-1][1] if curve else None}


def run_plain(mc, train, ev, classes, makes, budget, lr=3e-4):
  size, batch = int(mc['image_size']), 32
  t0 = time.time()
  base = M.backbone(mc)
  head = M.heads(int(base.output.shape[-1]), len(classes), len(makes), float(mc['dropout']))
  full = M.classifier(base, head, size)
  M.set_trainable(base, 'all')
  ev_ds = to_ds(ev, classes, makes, size, 64, False)
  y_ev = np.array([classes.index(r[1]) for r in ev])

  def evaluate():
    p = full.predict(ev_ds, verbose=0)[M.CLASS_OUT]
    return float((p.argmax(1) == y_ev).mean())

  per_epoch = -(-len(train) // batch)
  task._compile(full, M.WarmupCosine(lr, per_epoch * 30, per_epoch // 2), 0.1)  # pylint: disable=protected-access
  curve = []
  ts = time.time()
  h = full.fit(to_ds(train, classes, makes, size, batch, True), epochs=30, verbose=0,
               callbacks=[Budget(t0, budget, curve, evaluate)])
  epochs = len(h.history['loss'])
  return {'curve': curve, 'wall_s': round(time.time() - t0, 1), 'epochs': epochs,
          'train_photos_per_s': round(epochs * len(train) / (time.time() - ts), 1),
          'final_top1': curve[-1][1] if curve else None}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--examples', required=True)
  ap.add_argument('--config', default='default')
  ap.add_argument('--classes', type=int, default=40)
  ap.add_argument('--budget-s', type=float, default=300)
  args = ap.parse_args()
  tf.random.set_seed(1)
  cfg = config_lib.load(args.config)
  mc = dataclasses.asdict(cfg.model)
  all_classes = sorted({r[1] for r in load(args.examples, 'validation')})
  keep = set(all_classes[:args.classes])
  train, ev = load(args.examples, 'train', keep), load(args.examples, 'validation', keep)
  classes = sorted({r[1] for r in train})
  ev = [r for r in ev if r[1] in classes]
  makes = sorted({r[2] for r in train + ev})
  print(f'{len(classes)} classes, train {len(train)} photos, eval {len(ev)} photos', flush=True)
  plain = run_plain(mc, train, ev, classes, makes, args.budget_s)
  print('plain', json.dumps(plain), flush=True)
  cached = run_cached(mc, train, ev, classes, makes, args.budget_s)
  print('cached', json.dumps(cached), flush=True)
  target = plain['final_top1'] or 0.0
  reach = next((t for t, acc in cached['curve'] if acc >= target), None)
  print(json.dumps({
      'backbone': mc['backbone'], 'image_size': mc['image_size'], 'classes': len(classes),
      'train_photos': len(train), 'eval_photos': len(ev), 'budget_s': args.budget_s,
      'plain': plain, 'cached': cached, 'cached_time_to_plain_final_top1_s': reach,
      'cpus': os.cpu_count(), 'machine': platform.machine()}))


if __name__ == '__main__':
  main()

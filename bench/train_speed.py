"""Training-step throughput of the end-to-end stage, by input size, model input and photo cache.

  scripts/env.sh run 'python bench/train_speed.py --examples runs/car_ads/Transform/transformed_examples/<id> \
      --transform runs/car_ads/Transform/transform_graph/<id> [--steps 8]'

Runs the Trainer's own code (components/trainer: dataset, model, set_trainable, compile)
for a few steps of the top-14-block stage in each setting, after 2 warm-up steps (tracing
excluded; a `cached` setting fills its cache during these steps, as in a first epoch), and prints photos/s per setting as one JSON line.
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

from carvision.components import features as F  # noqa: E402
from carvision.components.backbone import efficientnet_lite as el  # noqa: E402
from carvision.components.trainer import model as M  # noqa: E402
from carvision.components.trainer import data  # noqa: E402
from carvision.components.trainer import task  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--examples', required=True)
  ap.add_argument('--transform', required=True)
  ap.add_argument('--steps', type=int, default=8)
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--top-blocks', type=int, default=14)
  ap.add_argument('--settings', default='static260,dynamic260,static224,dynamic224')
  args = ap.parse_args()
  tft_out = tft.TFTransformOutput(args.transform)
  spec = tft_out.transformed_feature_spec()
  n_classes = tft_out.vocabulary_size_by_name(F.vocab_name('class'))
  n_makes = tft_out.vocabulary_size_by_name(F.vocab_name('make'))
  files = sorted(glob.glob(os.path.join(args.examples, 'Split-train', '*')))
  out = {'batch': args.batch, 'steps': args.steps, 'top_blocks': args.top_blocks}
  for setting in args.settings.split(','):
    size = 224 if '224' in setting else 260
    if setting.startswith('data'):  # the input pipeline alone (decode, augment), no model
      ds = data.dataset(files, spec, size, args.batch, n_classes, n_makes, training=True,
                        repeat=True, decoded_size=260 if setting.endswith('cached') else None)
      it = iter(ds)
      next(it)
      t = time.time()
      for _ in range(args.steps):
        next(it)
      out[setting] = round(args.steps * args.batch / (time.time() - t), 1)
      print(setting, out[setting], 'photos/s', flush=True)
      continue
    dynamic = setting.startswith('dynamic') or setting.startswith('step')
    cached = setting.endswith('cached')
    shape = (None, None, 3) if dynamic else (size, size, 3)
    base = el.pretrained('efficientnet_lite2', shape)
    full = M.classifier(base, M.heads(int(base.output.shape[-1]), n_classes, n_makes, 0.3), size)
    M.set_trainable(base, 'top_blocks', args.top_blocks)
    task._compile(full, 1e-4, 0.1)  # pylint: disable=protected-access
    ds = data.dataset(files, spec, size, args.batch, n_classes, n_makes, training=True,
                      repeat=True, decoded_size=260 if cached else None)
    if setting.startswith('step'):  # the training step alone: one batch over and over
      ds = tf.data.Dataset.from_tensors(next(iter(ds))).repeat()
    it = iter(ds)
    step = full.make_train_function()
    for _ in range(2):
      step(it)
    t = time.time()
    for _ in range(args.steps):
      logs = step(it)
    float(logs['loss'])
    dt = time.time() - t
    out[setting] = round(args.steps * args.batch / dt, 1)
    print(setting, out[setting], 'photos/s', flush=True)
    keras.backend.clear_session()
  print(json.dumps(out))


if __name__ == '__main__':
  main()

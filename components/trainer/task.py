"""Trainer `run_fn`: staged EfficientNet-Lite fine-tuning that is practical on 2 CPU cores.

Stage `trainable: none` never runs the frozen backbone more than once per photo: its
pooled activations are computed once (plus a few augmented views) and only the heads
are trained on them. Later stages unfreeze the top blocks and train end to end on
augmented photos. The best epoch on the eval split is restored (early stopping).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from absl import logging

from components import features as F
from components.trainer import model as M
from components.trainer import export


def _files(patterns: List[str]) -> List[str]:
  out = []
  for p in patterns:
    out.extend(tf.io.gfile.glob(p if any(c in p for c in '*?[') else os.path.join(p, '*')))
  return sorted(out)


def decode(jpeg: tf.Tensor, size: int) -> tf.Tensor:
  """The model contract: the whole RGB photo, bilinear-resized to size x size, uint8."""
  img = tf.io.decode_jpeg(jpeg, channels=3)
  img = tf.image.resize(img, (size, size), method='bilinear', antialias=False)
  return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)


def augment(jpeg: tf.Tensor, size: int, seed=None) -> tf.Tensor:
  """Random resized crop (area 50-100 %), horizontal flip, brightness/contrast/saturation."""
  img = tf.io.decode_jpeg(jpeg, channels=3)
  begin, crop, _ = tf.image.sample_distorted_bounding_box(
      tf.shape(img), tf.zeros([1, 0, 4]), min_object_covered=0.0,
      aspect_ratio_range=(0.75, 1.33), area_range=(0.5, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  img = tf.slice(img, begin, crop)
  img = tf.image.resize(img, (size, size), method='bilinear')
  img = tf.image.random_flip_left_right(img)
  img = tf.image.random_brightness(img, 25.0)
  img = tf.image.random_contrast(img, 0.8, 1.2)
  img = tf.image.random_saturation(img, 0.8, 1.2)
  return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)


def dataset(files: List[str], spec: Dict, size: int, batch: int, n_classes: int, n_makes: int,
            training: bool, repeat: bool = False) -> tf.data.Dataset:
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  if training:
    ds = ds.shuffle(2048, seed=7, reshuffle_each_iteration=True)
  ds = ds.map(lambda s: tf.io.parse_single_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
  cls_key, make_key = F.label_id('class'), F.label_id('make')
  ds = ds.filter(lambda f: tf.reshape(f[cls_key], [-1])[0] >= 0)

  def to_xy(f):
    jpeg = tf.reshape(f[F.IMAGE], [-1])[0]
    img = augment(jpeg, size) if training else decode(jpeg, size)
    cls = tf.reshape(f[cls_key], [-1])[0]
    make = tf.reshape(f[make_key], [-1])[0]
    return img, {M.CLASS_OUT: tf.one_hot(cls, n_classes), M.MAKE_OUT: tf.one_hot(make, n_makes)}

  ds = ds.map(to_xy, num_parallel_calls=tf.data.AUTOTUNE)
  if repeat:
    ds = ds.repeat()
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def cached_features(base: keras.Model, ds: tf.data.Dataset):
  """Runs the frozen backbone once over `ds`; returns (features, labels dict)."""
  feats, cls, make = [], [], []
  for x, y in ds:
    feats.append(base(M.el.normalise(x), training=False).numpy())
    cls.append(y[M.CLASS_OUT].numpy())
    make.append(y[M.MAKE_OUT].numpy())
  if not feats:
    raise ValueError('no training examples with a known label')
  return np.concatenate(feats), {M.CLASS_OUT: np.concatenate(cls), M.MAKE_OUT: np.concatenate(make)}


def _compile(m: keras.Model, schedule, smoothing: float):
  m.compile(
      optimizer=keras.optimizers.Adam(schedule),
      loss={M.CLASS_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
            M.MAKE_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)},
      loss_weights={M.CLASS_OUT: 1.0, M.MAKE_OUT: 0.3},
      metrics={M.CLASS_OUT: [keras.metrics.CategoricalAccuracy(name='top1'),
                             keras.metrics.TopKCategoricalAccuracy(5, name='top5')],
               M.MAKE_OUT: [keras.metrics.CategoricalAccuracy(name='top1')]})


def run_fn(fn_args):
  """TFX Trainer entry point (GenericExecutor)."""
  t0 = time.time()
  cfg = json.loads(fn_args.custom_config['config'])
  mc = cfg['model']
  size, batch = int(mc['image_size']), int(mc['batch_size'])
  tft_out = tft.TFTransformOutput(fn_args.transform_output)
  n_classes = tft_out.vocabulary_size_by_name(F.vocab_name('class'))
  n_makes = tft_out.vocabulary_size_by_name(F.vocab_name('make'))
  spec = tft_out.transformed_feature_spec()
  train_files, eval_files = _files(fn_args.train_files), _files(fn_args.eval_files)
  logging.info('classes=%d makes=%d train files=%s', n_classes, n_makes, train_files)

  base = M.backbone(mc)
  n_feat = int(base.output.shape[-1])
  head = M.heads(n_feat, n_classes, n_makes, float(mc['dropout']))
  full = M.classifier(base, head, size)
  tb = keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, write_graph=False)
  history = {}
  smoothing = float(mc['label_smoothing'])
  patience = int(mc['early_stopping_patience'])

  def stop():
    return keras.callbacks.EarlyStopping(monitor='val_class_top1', mode='max', patience=patience,
                                         restore_best_weights=True)

  def data(files, training, repeat=False):
    return dataset(files, spec, size, batch, n_classes, n_makes, training=training, repeat=repeat)

  n_train = sum(1 for _ in tf.data.TFRecordDataset(train_files, compression_type='GZIP'))
  cache = None
  for stage in mc['stages']:
    name, epochs = stage['name'], int(stage['epochs'])
    ts = time.time()
    if stage['trainable'] == 'none':
      # Frozen backbone: features once (views = 1 clean + augmented copies), heads only.
      if cache is None:
        M.set_trainable(base, 'none')
        views = [data(train_files, False)]
        views += [data(train_files, True) for _ in range(int(mc['feature_views']) - 1)]
        parts = [cached_features(base, v) for v in views]
        xtr = np.concatenate([p[0] for p in parts])
        ytr = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        xev, yev = cached_features(base, data(eval_files, False))
        cache = (xtr, ytr, xev, yev)
        logging.info('cached features: train %s eval %s in %.1fs', xtr.shape, xev.shape,
                     time.time() - ts)
      xtr, ytr, xev, yev = cache
      steps = max(1, -(-len(xtr) // batch)) * epochs
      _compile(head, M.WarmupCosine(stage['learning_rate'], steps, steps // 10), smoothing)
      h = head.fit(xtr, ytr, batch_size=batch, epochs=epochs, validation_data=(xev, yev),
                   callbacks=[stop(), tb], verbose=2)
    else:
      M.set_trainable(base, stage['trainable'], int(stage.get('top_blocks', 2)))
      per_epoch = max(1, n_train // batch)
      _compile(full, M.WarmupCosine(stage['learning_rate'], per_epoch * epochs, per_epoch // 2),
               smoothing)
      h = full.fit(data(train_files, True, repeat=True), steps_per_epoch=per_epoch,
                   epochs=epochs, validation_data=data(eval_files, False),
                   callbacks=[stop(), tb], verbose=2)
    history[name] = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    history[name]['seconds'] = time.time() - ts
    logging.info('stage %s done in %.1fs: %s', name, time.time() - ts, history[name])

  # Final figures of the restored model on the eval split (Keras, float).
  _compile(full, 1e-4, smoothing)
  final = full.evaluate(data(eval_files, False), return_dict=True, verbose=0)
  logging.info('float model on eval split: %s', final)
  export.export_all(full, tft_out, fn_args, cfg, history={'stages': history, 'eval': final,
                                                           'train_seconds': time.time() - t0})

"""Co-Tuning (You et al., NeurIPS 2020): the ImageNet head the converted weights carry is
kept during fine-tuning and trained towards p(ImageNet class | car class), a soft target
learnt once from the frozen network's predictions on the train split. It transfers what the
pretrained classifier knows (a sports car, a pickup, a minivan) to 22 photos a class, at the
cost of one 1000-way dense layer. The head is not part of any exported model."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components.trainer import model as M

IMAGENET_OUT = 'imagenet'


def relationship(pooled: np.ndarray, classes: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                 n_classes: int, batch: int = 1024) -> np.ndarray:
  """[n_classes, 1000]: the mean ImageNet distribution of each car class's train rows (the
  paper's direct estimate). A class without rows gets the mean of all rows."""
  sums = np.zeros((n_classes, kernel.shape[1]), np.float64)
  counts = np.zeros(n_classes, np.int64)
  for i in range(0, len(pooled), batch):
    logits = pooled[i:i + batch].astype(np.float32) @ kernel + bias
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    np.add.at(sums, classes[i:i + batch], p)
    np.add.at(counts, classes[i:i + batch], 1)
  if not counts.any():
    raise ValueError('co-tuning: no train rows')
  overall = sums.sum(0) / counts.sum()
  rel = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], overall)
  return rel.astype(np.float32)


def training_model(full: keras.Model, imagenet: keras.layers.Dense) -> keras.Model:
  """`full`'s layers (shared: training it trains `full`) plus the ImageNet head on the
  pooled features: outputs class, make, imagenet."""
  head, base = full.get_layer('heads'), M.backbone_of(full)
  pixels = keras.Input(full.input_shape[1:], name='pixels')
  feats = base(full.get_layer('normalise')(pixels))
  out = M.named(head(feats))
  out[IMAGENET_OUT] = keras.layers.Activation('linear', name=IMAGENET_OUT)(imagenet(feats))
  return keras.Model(pixels, out, name='carvision_co_tuning')


def head_layer(kernel: np.ndarray, bias: np.ndarray) -> keras.layers.Dense:
  layer = keras.layers.Dense(kernel.shape[1], activation='softmax', dtype='float32',
                             name='imagenet_head')
  layer.build((None, kernel.shape[0]))
  layer.set_weights([kernel, bias])
  return layer


def loss(rel: np.ndarray):
  """Cross-entropy against the soft ImageNet target of each row's car class: y_true is the
  class one-hot (the dataset's class label, repeated under `imagenet`)."""
  table = tf.constant(rel)

  def co_tuning_loss(y_true, y_pred):
    return keras.losses.categorical_crossentropy(tf.matmul(tf.cast(y_true, tf.float32), table),
                                                 y_pred)
  return co_tuning_loss


def with_target(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Adds the imagenet target (the class one-hot) to a dataset of (pixels, labels)."""
  return ds.map(lambda x, y: (x, {**y, IMAGENET_OUT: y[M.CLASS_OUT]}))

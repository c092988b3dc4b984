"""Early-learning regularisation (Liu et al., ELR, NeurIPS 2020): a network fits the labels
that agree with each other before it memorises the exceptions, so its early predictions of
a photo whose seller picked the wrong listing still point at what the photo shows. Each
train photo keeps a running average of the network's class predictions (its target, updated
with `momentum` every time the photo is trained on); the class loss gets a term,
weight * log(1 - <target, prediction>), that pulls each prediction towards its own
target, against the cross-entropy's pull towards a wrong listed label late in training.
Nothing is left out and nothing is decided per ad: a soft alternative to the audits.

The targets are a variable of the training model: a checkpoint keeps them, so a resumed
stage goes on with the targets the stopped one had. Each end-to-end stage starts its own.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components.trainer import model as M

KEY = 'key'  # the label entry with the photo key (data.dataset(keyed=True))
CLIP = 1e-4  # predictions are clipped to [CLIP, 1 - CLIP] in the term, as in the paper


def term(targets, probs, eps: float = CLIP):
  """The batch-mean regulariser log(1 - <t, p>) for targets t and predictions p."""
  p = tf.clip_by_value(tf.cast(probs, tf.float32), eps, 1.0 - eps)
  return tf.reduce_mean(tf.math.log(1.0 - tf.reduce_sum(targets * p, -1)))


class EarlyLearningModel(keras.Model):  # pylint: disable=abstract-method
  """A functional model (the layers of the one it wraps: training it trains them) whose
  training steps read the photo keys among the labels and add the early-learning term to
  the class loss; evaluation is unchanged and needs no keys."""

  def __init__(self, *args, photos=(), n_classes: int = 0, weight: float = 0.0,
               momentum: float = 0.7, views: int = 1, **kwargs):
    super().__init__(*args, **kwargs)
    self.weight, self.momentum, self.views = float(weight), float(momentum), int(views)
    keys = np.unique(np.asarray(photos, np.int64))
    # A photo not in `photos` reads and writes one spare row, shared and never relied on.
    self._rows = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys), tf.range(len(keys), dtype=tf.int64)), len(keys))
    self.targets = tf.Variable(tf.zeros([len(keys) + 1, n_classes]), trainable=False,
                               name='early_learning_targets')
    self._batch_keys = None

  def train_step(self, data):
    x, y, w = keras.utils.unpack_x_y_sample_weight(data)
    y = dict(y)
    if KEY not in y:
      raise ValueError('early learning: training batches carry no photo keys '
                       '(data.dataset keyed=True)')
    self._batch_keys = y.pop(KEY)  # read while train_step is traced
    try:
      return super().train_step((x, y) if w is None else (x, y, w))
    finally:
      self._batch_keys = None

  def test_step(self, data):
    x, y, w = keras.utils.unpack_x_y_sample_weight(data)
    y = {k: v for k, v in dict(y).items() if k != KEY}
    return super().test_step((x, y) if w is None else (x, y, w))

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
    loss = super().compute_loss(x, y, y_pred, sample_weight)
    if self._batch_keys is None or self.weight <= 0:
      return loss
    p = tf.cast(y_pred[M.CLASS_OUT], tf.float32)
    rows = self._rows.lookup(tf.cast(self._batch_keys, tf.int64) // self.views)
    now = tf.stop_gradient(tf.clip_by_value(p, CLIP, 1.0 - CLIP))
    now = now / tf.reduce_sum(now, -1, keepdims=True)
    t = self.momentum * tf.gather(self.targets, rows) + (1.0 - self.momentum) * now
    self.targets.scatter_nd_update(rows[:, None], t)
    return loss + self.weight * term(t, p)


def wrap(net: keras.Model, weight: float, momentum: float, photos, n_classes: int,
         views: int) -> keras.Model:
  """`net` itself when weight is 0, else an EarlyLearningModel on its layers; `photos`:
  the train photo keys (the keys in the labels divided by `views`)."""
  if weight <= 0:
    return net
  return EarlyLearningModel(inputs=net.input, outputs=net.output,
                            name=f'{net.name}_early_learning', photos=photos,
                            n_classes=n_classes, weight=weight, momentum=momentum, views=views)

"""Small-loss selection (Han et al., Co-teaching, NeurIPS 2018; Jiang et al., MentorNet,
ICML 2018): a network fits the labels that agree with each other before it memorises the
exceptions, so early in training the photos whose label it finds hardest are mostly the
ones a seller got wrong. Each training batch leaves its highest-loss share out of every
loss (class, make, Co-Tuning: all follow the class label), ramped up from zero over the
first epochs of the first end-to-end stage, while the network is still learning the
majority. The share is the expected share of wrong labels; validation is untouched.

The ramp reads the optimizer's step count, which a checkpoint restores: a resumed stage
drops what the stopped one would have dropped.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from carvision.components.trainer import model as M


def keep_weights(y_true, y_pred, share, eps: float = 1e-7):
  """[batch] weights: 0 for the ceil(share * batch) photos of highest class cross-entropy,
  batch / kept for the others (the batch-mean loss keeps its scale). Ties at the threshold
  are all kept."""
  loss = tf.stop_gradient(-tf.reduce_sum(
      tf.cast(y_true, tf.float32) * tf.math.log(tf.cast(y_pred, tf.float32) + eps), -1))
  n = tf.shape(loss)[0]
  drop = tf.minimum(tf.cast(tf.math.ceil(tf.cast(share, tf.float32) * tf.cast(n, tf.float32)),
                            tf.int32), n - 1)
  kept = n - drop
  threshold = tf.sort(loss)[kept - 1]
  keep = tf.cast(loss <= threshold, tf.float32)
  return keep * tf.cast(n, tf.float32) / tf.maximum(tf.reduce_sum(keep), 1.0)


def share_at(step, share: float, warmup_steps: int):
  """The share dropped at optimizer step `step`: linear from 0 to `share` over warmup_steps."""
  if warmup_steps <= 0:
    return tf.constant(share, tf.float32)
  ramp = tf.cast(step, tf.float32) / float(warmup_steps)
  return share * tf.clip_by_value(ramp, 0.0, 1.0)


class SmallLossModel(keras.Model):  # pylint: disable=abstract-method
  """A functional model (the layers of the one it wraps: training it trains them) whose
  training steps weight out each batch's highest-loss photos; evaluation is unchanged."""

  def __init__(self, *args, share: float = 0.0, warmup_steps: int = 0, **kwargs):
    super().__init__(*args, **kwargs)
    self.share, self.warmup_steps = float(share), int(warmup_steps)
    self._in_train_step = False

  def train_step(self, data):
    self._in_train_step = True  # read while train_step is traced, not at run time
    try:
      return super().train_step(data)
    finally:
      self._in_train_step = False

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
    if self._in_train_step and self.share > 0 and y is not None:
      w = keep_weights(y[M.CLASS_OUT], y_pred[M.CLASS_OUT],
                       share_at(self.optimizer.iterations, self.share, self.warmup_steps))
      sample_weight = w if sample_weight is None else w * sample_weight
    return super().compute_loss(x, y, y_pred, sample_weight)


def wrap(net: keras.Model, share: float, warmup_steps: int) -> keras.Model:
  """`net` itself when share is 0, else a SmallLossModel on its layers."""
  if share <= 0:
    return net
  return SmallLossModel(inputs=net.input, outputs=net.output, name=f'{net.name}_small_loss',
                        share=share, warmup_steps=warmup_steps)

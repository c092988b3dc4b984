"""Early-learning regularisation: a training step is the plain step plus the gradient of
weight * log(1 - <t, p>) with each photo's target t moved towards its prediction; the
targets survive a checkpoint; evaluation and a weight of 0 are the plain model."""
import numpy as np
import pytest

from carvision.components.trainer import early_learning as EL
from carvision.components.trainer import model as M

VIEWS = 64


def _net(seed=0):
  import tf_keras as keras
  keras.utils.set_random_seed(seed)
  x = keras.Input((6,), name='pixels')
  return keras.Model(x, M.named(M.heads(6, 4, 2, 0.0)(x)))


def _batch(n=8):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = {M.CLASS_OUT: np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)],
       M.MAKE_OUT: np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]}
  photos = np.arange(100, 100 + n, dtype=np.int64) * 7919
  return x, y, photos


def _compile(net):
  import tf_keras as keras
  ce = keras.losses.CategoricalCrossentropy
  net.compile(optimizer=keras.optimizers.SGD(0.1),
              loss={M.CLASS_OUT: ce(), M.MAKE_OUT: ce()},
              loss_weights={M.CLASS_OUT: 1.0, M.MAKE_OUT: 0.3})
  return net


def _reference_step(net, x, y, targets, weight, momentum):
  """One SGD step on the plain losses plus the term, by hand; returns (weights, new targets)."""
  import tensorflow as tf
  import tf_keras as keras
  ce = keras.losses.categorical_crossentropy
  with tf.GradientTape() as tape:
    out = net(x, training=True)
    p = out[M.CLASS_OUT]
    now = tf.stop_gradient(tf.clip_by_value(p, 1e-4, 1 - 1e-4))
    t = momentum * targets + (1 - momentum) * now / tf.reduce_sum(now, -1, keepdims=True)
    loss = (tf.reduce_mean(ce(y[M.CLASS_OUT], p)) + 0.3 * tf.reduce_mean(ce(y[M.MAKE_OUT], out[M.MAKE_OUT]))
            + weight * tf.reduce_mean(tf.math.log(1 - tf.reduce_sum(t * tf.clip_by_value(p, 1e-4, 1 - 1e-4), -1))))
  grads = tape.gradient(loss, net.trainable_variables)
  for v, g in zip(net.trainable_variables, grads):
    v.assign_sub(0.1 * g)
  return [w.copy() for w in net.get_weights()], t.numpy()


def test_the_term_is_the_batch_mean_of_log_one_minus_the_agreement():
  t = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
  p = np.array([[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]], np.float32)
  clipped = np.clip(p, 1e-4, 1 - 1e-4)
  want = np.mean(np.log(1 - (t * clipped).sum(-1)))
  assert float(EL.term(t, p)) == pytest.approx(want, rel=1e-5)


def test_steps_add_the_term_and_move_each_photos_target():
  x, y, photos = _batch()
  keys = photos * VIEWS + 3  # a view's key: the photo's, times the views, plus the view
  inner = _net()
  elr = _compile(EL.wrap(inner, 3.0, 0.7, photos[::-1], 4, VIEWS))
  assert isinstance(elr, EL.EarlyLearningModel)
  ref = _net()
  targets = np.zeros((8, 4), np.float32)
  order = np.argsort(photos)  # the model's rows are the photos sorted
  for _ in range(2):  # the second step reads the targets the first one wrote
    elr.train_on_batch(x, {**y, EL.KEY: keys})
    want, targets = _reference_step(ref, x, y, targets, 3.0, 0.7)
    for a, b in zip(inner.get_weights(), want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(elr.targets.numpy()[:8][np.argsort(order)], targets, rtol=1e-5, atol=1e-7)
  assert not elr.targets.numpy()[8].any()  # the spare row: no unknown photo was seen
  with pytest.raises(ValueError, match='training batches carry no photo keys'):
    elr.train_on_batch(x, y)
  # evaluation: the plain losses, with or without keys among the labels
  plain = {k: v for k, v in _compile(inner).evaluate(x, y, return_dict=True, verbose=0).items()}
  for labels in (y, {**y, EL.KEY: keys}):
    got = elr.evaluate(x, labels, return_dict=True, verbose=0)
    assert {k: v for k, v in got.items() if 'loss' in k} == pytest.approx(
        {k: v for k, v in plain.items() if 'loss' in k}, rel=1e-6)


def test_the_targets_are_kept_by_a_checkpoint(tmp_path):
  import tensorflow as tf
  x, y, photos = _batch()
  elr = _compile(EL.wrap(_net(), 3.0, 0.7, photos, 4, VIEWS))
  elr.train_on_batch(x, {**y, EL.KEY: photos * VIEWS})
  path = tf.train.Checkpoint(model=elr).write(str(tmp_path / 'ckpt'))
  again = _compile(EL.wrap(_net(seed=1), 3.0, 0.7, photos, 4, VIEWS))
  assert not again.targets.numpy().any()
  tf.train.Checkpoint(model=again).read(path).expect_partial()
  np.testing.assert_array_equal(again.targets.numpy(), elr.targets.numpy())
  assert again.targets.numpy()[:8].sum() == pytest.approx(8 * 0.3, rel=1e-5)


def test_no_weight_is_the_plain_model():
  net = _net()
  assert EL.wrap(net, 0.0, 0.7, np.arange(3), 4, VIEWS) is net

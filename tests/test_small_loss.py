"""Small-loss selection: a training step on a batch is the step on its lowest-loss photos
alone, for every loss; evaluation and a share of 0 are the plain model."""
import numpy as np
import pytest

from carvision.components.trainer import model as M
from carvision.components.trainer import small_loss as SL


def _net(seed=0):
  import tf_keras as keras
  keras.utils.set_random_seed(seed)
  x = keras.Input((6,), name='pixels')
  return keras.Model(x, M.named(M.heads(6, 4, 2, 0.0)(x)))


def _batch(n=10):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = {M.CLASS_OUT: np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)],
       M.MAKE_OUT: np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]}
  return x, y


def _compiled(net):
  """`net` compiled with SGD and the Trainer's two losses and their weights."""
  import tf_keras as keras
  ce = keras.losses.CategoricalCrossentropy
  net.compile(optimizer=keras.optimizers.SGD(0.1),
              loss={M.CLASS_OUT: ce(), M.MAKE_OUT: ce()},
              loss_weights={M.CLASS_OUT: 1.0, M.MAKE_OUT: 0.3})
  return net


def _one_step(net, x, y):
  """The weights after one SGD step on (x, y)."""
  _compiled(net).train_on_batch(x, y)
  return [w.copy() for w in net.get_weights()]


def test_keep_weights_leave_out_the_highest_losses_and_keep_the_batch_scale():
  import tensorflow as tf
  y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
  p = np.array([[.9, .05, .05], [.1, .1, .8], [.2, .2, .6], [.05, .9, .05], [.3, .6, .1]],
               np.float32)  # losses: 0.11, 2.3, 0.51, 3.0, 0.51
  w = SL.keep_weights(tf.constant(y), tf.constant(p), 0.4).numpy()
  np.testing.assert_allclose(w, [5 / 3, 0, 5 / 3, 0, 5 / 3], rtol=1e-6)
  np.testing.assert_allclose(SL.keep_weights(y, p, 0.0).numpy(), np.ones(5))
  assert SL.keep_weights(y[:1], p[:1], 0.5).numpy().tolist() == [1.0]  # never the whole batch
  ramp = [float(SL.share_at(s, 0.2, 10)) for s in (0, 5, 10, 50)]
  np.testing.assert_allclose(ramp, [0.0, 0.1, 0.2, 0.2], rtol=1e-6)


def test_a_step_trains_on_the_low_loss_photos_only_and_evaluation_is_unchanged():
  x, y = _batch()
  plain = _net()
  p = plain.predict(x, verbose=0)[M.CLASS_OUT]
  loss = -np.log((p * y[M.CLASS_OUT]).sum(-1))
  kept = np.argsort(loss)[:7]  # share 0.3 of 10 photos: the 3 hardest are left out
  want = _one_step(plain, x[kept], {k: v[kept] for k, v in y.items()})

  inner = _net()
  small = SL.wrap(inner, 0.3, warmup_steps=0)
  assert isinstance(small, SL.SmallLossModel)
  got = _one_step(small, x, y)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # the wrapped model's layers are the trained ones, and evaluating weighs every photo
  for a, b in zip(inner.get_weights(), got):
    np.testing.assert_array_equal(a, b)
  ev = {k: v for k, v in small.evaluate(x, y, return_dict=True, verbose=0).items() if 'loss' in k}
  ref = {k: v for k, v in _compiled(inner).evaluate(x, y, return_dict=True, verbose=0).items() if 'loss' in k}
  assert ev == pytest.approx(ref, rel=1e-6)


def test_no_share_is_the_plain_model_and_the_ramp_starts_from_every_photo():
  x, y = _batch()
  net = _net()
  assert SL.wrap(net, 0.0, 5) is net
  want = _one_step(_net(), x, y)
  got = _one_step(SL.wrap(_net(), 0.3, warmup_steps=100), x, y)  # step 0 of the ramp: share 0
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

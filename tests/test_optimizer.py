"""A stage's weight_decay: AdamW shrinks the kernels it trains by lr x decay a step, and
leaves biases alone; 0 is plain Adam."""
import numpy as np
import tf_keras as keras

from carvision.components.trainer import config as C
from carvision.components.trainer import task


def _dense():
  x = keras.Input((4,))
  m = keras.Model(x, keras.layers.Dense(3, kernel_initializer='ones', bias_initializer='ones')(x))
  return m


def test_weight_decay_shrinks_kernels_not_biases():
  m = _dense()
  opt = task._optimizer(0.1, weight_decay=0.5)  # pylint: disable=protected-access
  assert isinstance(opt, keras.optimizers.AdamW)
  zeros = [np.zeros(v.shape, np.float32) for v in m.trainable_variables]
  opt.apply_gradients(zip(zeros, m.trainable_variables))  # no gradient: only the decay acts
  kernel, bias = m.get_weights()
  np.testing.assert_allclose(kernel, 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(bias, 1.0)


def test_no_weight_decay_is_adam_and_the_stage_default():
  assert type(task._optimizer(0.1)) is keras.optimizers.Adam  # pylint: disable=protected-access
  assert C.StageConfig().weight_decay == 0.0
  assert C.StageConfig(weight_decay=0.05).weight_decay == 0.05

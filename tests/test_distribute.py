"""The Trainer's tf.distribute strategy: a 2-replica MirroredStrategy on 2 logical CPUs trains
the same model as one device (the same global batch and learning rate)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = r'''
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tf_keras as keras
from carvision.components.trainer import data, distribute, model as M, task

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 16)).astype(np.float16)
y = {M.CLASS_OUT: rng.integers(0, 5, 64), M.MAKE_OUT: rng.integers(0, 3, 64)}
out = {}
for name, per_replica, lr in (('none', 8, 0.02), ('mirrored', 4, 0.01)):
  strategy = distribute.set_up(name)
  batch, lr_scaled = distribute.scaled(per_replica, lr, strategy.num_replicas_in_sync)
  with strategy.scope():
    head = M.heads(16, 5, 3, 0.0)
    head.set_weights([np.full(w.shape, 0.05, np.float32) * (i + 1)
                      for i, w in enumerate(head.get_weights())])
    task._compile(head, lr_scaled, 0.1)
    seq = data.ArrayBatches(x, y, batch, {M.CLASS_OUT: 5, M.MAKE_OUT: 3}, shuffle=False)
    head.fit(seq, epochs=3, verbose=0, shuffle=False)
  out[name] = {'replicas': strategy.num_replicas_in_sync, 'batch': batch, 'lr': lr_scaled,
               'weights': [w.tolist() for w in head.get_weights()]}
print('RESULT ' + json.dumps(out))
'''


def test_two_replicas_train_like_one_device():
  res = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(next(l for l in res.stdout.splitlines() if l.startswith('RESULT '))[7:])
  one, two = out['none'], out['mirrored']
  assert (one['replicas'], two['replicas']) == (1, 2)
  assert one['batch'] == two['batch'] == 8 and one['lr'] == pytest.approx(two['lr'])
  import numpy as np
  for a, b in zip(one['weights'], two['weights']):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
  moved = np.abs(np.array(one['weights'][0]) - 0.05).max()
  assert moved > 1e-3  # it trained


def test_unknown_strategy_is_refused():
  from carvision.components.trainer import distribute
  with pytest.raises(ValueError, match='model.distribute'):
    distribute.strategy_for('horovod')
  assert distribute.scaled(16, 0.001, 4) == (64, 0.004)

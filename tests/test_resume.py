"""Early stopping across the two fits of a stage the label audit splits: no roll-back to the
best epoch in between, the counters go on."""
import numpy as np
import tf_keras as keras

from carvision.components.trainer import resume


class _Scores(keras.callbacks.Callback):
  """Feeds the monitor a fixed validation score per epoch (logs are seen in callback order)."""

  def __init__(self, scores):
    super().__init__()
    self.scores = scores

  def on_epoch_end(self, epoch, logs=None):
    logs['val_score'] = self.scores[epoch]


def _fit(model, stop, scores, start, end):
  x = np.ones((8, 2), np.float32)
  model.fit(x, x[:, :1], epochs=end, initial_epoch=start, verbose=0,
            callbacks=[_Scores(scores), stop])


def test_a_paused_stop_keeps_the_last_weights_and_its_counters():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(keras.optimizers.SGD(0.1), 'mse')
  scores = [0.5, 0.9, 0.6, 0.7, 0.8, 0.95]
  stop = resume.ResumableStop(monitor='val_score', mode='max', patience=3,
                              restore_best_weights=True)
  stop.paused = True
  _fit(model, stop, scores, 0, 3)  # best at epoch 2 (0.9), then 0.6
  last = [w.copy() for w in model.get_weights()]
  best = [w.copy() for w in stop.best_weights]
  assert not all(np.allclose(a, b) for a, b in zip(last, best))
  assert all(np.allclose(a, b) for a, b in zip(model.get_weights(), last))  # no roll-back
  stop.paused = False
  _fit(model, stop, scores, 3, 6)
  # the counters went on: 0.7 and 0.8 do not beat 0.9 (wait 3 = patience: stopped at epoch 5)
  assert model.stop_training and stop.best == 0.9
  assert all(np.allclose(a, b) for a, b in zip(model.get_weights(), best))  # then rolled back


def test_an_unpaused_stop_rolls_back_at_the_end_of_its_fit():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(keras.optimizers.SGD(0.1), 'mse')
  stop = resume.ResumableStop(monitor='val_score', mode='max', patience=5,
                              restore_best_weights=True)
  _fit(model, stop, [0.5, 0.9, 0.6], 0, 3)
  assert all(np.allclose(a, b) for a, b in zip(model.get_weights(), stop.best_weights))


def test_saved_arrays_survive_checkpoints_and_are_whole_or_absent(tmp_path):
  """A label-audit fold's scores: read back as written, untouched by the checkpoints that
  replace each other in the same directory; none without a directory."""
  ck = resume.Checkpoints(str(tmp_path), 'key')
  assert ck.load_arrays('label_audit/fold-0-of-2.npz') is None
  ck.save_arrays('label_audit/fold-0-of-2.npz', {'keys': np.arange(3), 'probs': np.eye(3)})
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  for kind in ('done', 'epoch', 'done'):
    ck.write({'done': 0}, model, kind=kind)
  got = resume.Checkpoints(str(tmp_path), 'key').load_arrays('label_audit/fold-0-of-2.npz')
  np.testing.assert_array_equal(got['keys'], np.arange(3))
  np.testing.assert_array_equal(got['probs'], np.eye(3))
  assert not list((tmp_path / 'Trainer' / 'key' / 'label_audit').glob('.*'))  # no temporary left
  none = resume.Checkpoints(None, 'key')
  none.save_arrays('x.npz', {'a': np.ones(2)})
  assert none.load_arrays('x.npz') is None

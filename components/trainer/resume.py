"""Trainer checkpoints under the pipeline root, so a stopped Trainer goes on where it was.

A run's checkpoints live in `<pipeline root>/_resume/Trainer/<key>/`, the key a hash of
everything that decides the result (the Trainer's config, its input files, the transform
graph, the warm-start model): a changed config or new data never resumes another run's
weights. Two kinds of checkpoint, each written whole into a new directory and then named by
an atomic `latest` file:

* after each finished stage: the model, the best validation top-1 so far, the history;
* during an end-to-end stage (the long ones), after an epoch at most every
  `model.checkpoint_every_s` seconds: the model, the optimizer (so the learning-rate schedule goes on), the
  early-stopping state with its best weights, and the epoch history; the end-to-end stages
  of a label-audit fold's pass too, marked with the fold.

Cached stages (minutes) restart from their beginning; the activations are recomputed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

LATEST = 'latest'
STATE = 'state.json'


def run_key(config_json: str, inputs: List[str]) -> str:
  """What decides a Trainer's result, hashed: its config and the URIs of what it reads."""
  h = hashlib.sha256(config_json.encode())
  for name in inputs:
    h.update(b'\0' + str(name).encode())
  return h.hexdigest()[:16]


class Checkpoints:
  """The checkpoints of one Trainer run (`root` None: none are written or read)."""

  def __init__(self, root: Optional[str], key: str, every_s: float = 60.0):
    self.dir = os.path.join(root, 'Trainer', key) if root else None
    self.every_s = every_s
    self.count = 0
    self.done_name = None  # the newest after-a-stage checkpoint (an epoch one's roll-back point)
    self.last_write = time.time()

  # --- reading -----------------------------------------------------------------------

  def latest(self) -> Optional[Dict[str, Any]]:
    """The newest whole checkpoint's state (with its directory under 'path'), or None."""
    if not self.dir:
      return None
    pointer = os.path.join(self.dir, LATEST)
    if not tf.io.gfile.exists(pointer):
      return None
    with tf.io.gfile.GFile(pointer) as f:
      path = os.path.join(self.dir, f.read().strip())
    with tf.io.gfile.GFile(os.path.join(path, STATE)) as f:
      state = json.load(f)
    self.count = int(state.get('count', 0))
    self.done_name = state.get('done_dir')
    return {**state, 'path': path,
            'done_path': os.path.join(self.dir, self.done_name) if self.done_name else None}

  @staticmethod
  def restore(path: str, model: keras.Model, optimizer=None) -> None:
    ckpt = tf.train.Checkpoint(model=model, **({'optimizer': optimizer} if optimizer else {}))
    ckpt.read(os.path.join(path, 'ckpt')).expect_partial()

  @staticmethod
  def best_weights(path: str) -> Optional[List[np.ndarray]]:
    name = os.path.join(path, 'best_weights.npz')
    if not tf.io.gfile.exists(name):
      return None
    with tf.io.gfile.GFile(name, 'rb') as f:
      data = np.load(io.BytesIO(f.read()))
      return [data[f'w{i}'] for i in range(len(data.files))]

  def load_arrays(self, name: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays save_arrays wrote under `name`, or None (none written, or no directory)."""
    path = os.path.join(self.dir, name) if self.dir else None
    if not path or not tf.io.gfile.exists(path):
      return None
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = np.load(io.BytesIO(f.read()))
      return {k: data[k] for k in data.files}

  # --- writing -----------------------------------------------------------------------

  def save_arrays(self, name: str, arrays: Dict[str, np.ndarray]) -> None:
    """Finished work that is not a checkpoint (a label-audit fold's scores), written whole
    (a temporary name, then renamed): a stop leaves it or nothing."""
    if not self.dir:
      return
    path = os.path.join(self.dir, name)
    tf.io.gfile.makedirs(os.path.dirname(path))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp')
    with tf.io.gfile.GFile(tmp, 'wb') as f:
      f.write(buf.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)

  def write(self, state: Dict[str, Any], model: keras.Model, optimizer=None,
            best_weights: Optional[List[np.ndarray]] = None, kind: str = 'epoch') -> None:
    """A new checkpoint directory, written whole, then named by `latest`. Older ones of the
    kind go; an epoch checkpoint keeps the stage's start (the last `done` one) for roll-back."""
    if not self.dir:
      return
    self.count += 1
    name = f'{kind}-{self.count:05d}'
    final = os.path.join(self.dir, name)
    partial = os.path.join(self.dir, f'.partial-{name}')
    if tf.io.gfile.exists(partial):
      tf.io.gfile.rmtree(partial)
    tf.io.gfile.makedirs(partial)
    ckpt = tf.train.Checkpoint(model=model, **({'optimizer': optimizer} if optimizer else {}))
    ckpt.write(os.path.join(partial, 'ckpt'))
    if best_weights is not None:
      buf = io.BytesIO()
      np.savez(buf, **{f'w{i}': w for i, w in enumerate(best_weights)})
      with tf.io.gfile.GFile(os.path.join(partial, 'best_weights.npz'), 'wb') as f:
        f.write(buf.getvalue())
    done = name if kind == 'done' else self.done_name
    with tf.io.gfile.GFile(os.path.join(partial, STATE), 'w') as f:
      json.dump({**state, 'count': self.count, 'done_dir': done}, f)
    tf.io.gfile.rename(partial, final, overwrite=True)
    tmp = os.path.join(self.dir, f'.{LATEST}.tmp')
    with tf.io.gfile.GFile(tmp, 'w') as f:
      f.write(name)
    tf.io.gfile.rename(tmp, os.path.join(self.dir, LATEST), overwrite=True)
    self.done_name = done
    for old in tf.io.gfile.listdir(self.dir):
      old = old.rstrip('/')
      if old.startswith(('done-', 'epoch-')) and old not in (name, done):
        tf.io.gfile.rmtree(os.path.join(self.dir, old))
    self.last_write = time.time()

  def clear(self) -> None:
    """After the export: the run is done, its checkpoints are not needed again."""
    if self.dir and tf.io.gfile.exists(self.dir):
      tf.io.gfile.rmtree(self.dir)


class ResumableStop(keras.callbacks.EarlyStopping):
  """EarlyStopping whose counters and best weights survive a stop (`state` / `restored`)
  and, with `paused` set, the end of one `fit` of a stage that another `fit` continues (the
  label audit splits a stage in two): the weights are then not rolled back to the best
  epoch in between, and the next `fit` starts from this one's counters."""

  def __init__(self, restored: Optional[Dict[str, Any]] = None,
               best_weights: Optional[List[np.ndarray]] = None, **kw):
    super().__init__(**kw)
    self._restored, self._restored_weights = restored, best_weights
    self.paused = False

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if self._restored:
      self.wait = int(self._restored['wait'])
      self.best = float(self._restored['best'])
      self.best_epoch = int(self._restored.get('best_epoch', 0))
      self.best_weights = self._restored_weights

  def on_train_end(self, logs=None):
    if self.paused and not self.model.stop_training:
      self._restored, self._restored_weights = self.state(), self.best_weights
      return
    super().on_train_end(logs)

  def state(self) -> Dict[str, Any]:
    return {'wait': int(self.wait), 'best': float(self.best),
            'best_epoch': int(getattr(self, 'best_epoch', 0))}


class EpochCheckpoint(keras.callbacks.Callback):
  """After an epoch of an end-to-end stage (at most every `every_s` seconds, and after its
  last epoch): the model, its optimizer, the early-stopping state and the epoch history."""

  def __init__(self, checkpoints: Checkpoints, base_state: Dict[str, Any], stage_index: int,
               epochs: int, stop: ResumableStop, history: Optional[Dict[str, List[float]]] = None,
               fold: Optional[int] = None):
    super().__init__()
    self.ck, self.base, self.index, self.epochs, self.stop = (checkpoints, base_state,
                                                              stage_index, epochs, stop)
    self.fold = fold  # a label-audit fold's pass (its checkpoints are not the run's stage's)
    self.history = {k: list(v) for k, v in (history or {}).items()}

  def on_epoch_end(self, epoch, logs=None):
    for k, v in (logs or {}).items():
      self.history.setdefault(k, []).append(float(v))
    last = epoch + 1 >= self.epochs or self.model.stop_training
    if not last and time.time() - self.ck.last_write < self.ck.every_s:
      return
    self.ck.write({**self.base(), 'stage': {
        'index': self.index, 'epoch': epoch + 1, 'stop': self.stop.state(),
        'stopped': bool(self.model.stop_training), 'history': self.history,
        **({'fold': self.fold} if self.fold is not None else {})}},
        self.model, self.model.optimizer, self.stop.best_weights, kind='epoch')

"""Running a trained carvision model the way clients do (scoring: components/scoring.py,
the report: components/report.py).

Shared by the TFLite gate (components/tflite_evaluator), the Pusher and
`carvision predict` / `carvision evaluate`. The contract: the whole RGB photo,
bilinear-resized to the model's H x W, uint8 0..255; output = probabilities in
labels.txt order. Decoding/resizing uses the exact function the Trainer used.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from components.names import PUSHED_SAVED_MODEL
from components.names import INT8, LABELS, SERVE, TFLITE_DIR


def read_labels(path: str) -> List[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path) as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def pixels(jpeg: bytes, size: int) -> np.ndarray:
  """uint8 [size, size, 3] exactly as in training and serving (components/trainer/task.decode)."""
  from components.trainer import task  # pylint: disable=g-import-not-at-top
  return task.decode(jpeg, size).numpy()


class TFLiteModel:
  """An int8 (or fp16) TFLite classifier with its labels; one interpreter, batch of 1."""

  def __init__(self, path: str, labels: Optional[List[str]] = None, threads: Optional[int] = None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, 'rb') as f:
      self.content = f.read()
    self.path = path
    self.interp = Interpreter(model_content=self.content, num_threads=threads)
    self.interp.allocate_tensors()
    self.inp = self.interp.get_input_details()[0]
    outs = self.interp.get_output_details()
    self.size = int(self.inp['shape'][1])
    if labels is None:
      labels = read_labels(os.path.join(os.path.dirname(path), LABELS))
    self.labels = labels
    # output 0: classes; output 1 (files exported since both heads ship): makes
    self.out = outs[0]
    self.make_out = outs[1] if len(outs) > 1 else None
    if labels and int(self.out['shape'][-1]) != len(labels):
      raise ValueError(f'{path}: output of {int(self.out["shape"][-1])} classes, '
                       f'{len(labels)} labels')

  def predict_pixels(self, batch: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float probabilities [N, classes]."""
    out = []
    scale, zero = self.out['quantization']
    for img in batch:
      self.interp.set_tensor(self.inp['index'], img[None].astype(self.inp['dtype']))
      self.interp.invoke()
      y = self.interp.get_tensor(self.out['index'])[0]
      out.append((y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32))
    return np.stack(out)

  def predict_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
    return self.predict_pixels(np.stack([pixels(j, self.size) for j in jpegs]))


class SavedModel:
  """The float SavedModel's `serving_default`: JPEG bytes in, probabilities out."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.path = path
    self.fn = tf.saved_model.load(path).signatures['serving_default']
    for cand in (os.path.join(path, TFLITE_DIR, LABELS), os.path.join(path, '..', LABELS)):
      if tf.io.gfile.exists(cand):
        self.labels = read_labels(cand)
        break
    else:
      raise FileNotFoundError(f'no labels.txt for the SavedModel at {path}')

  def predict_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return self.fn(images=tf.constant(list(jpegs)))['probabilities'].numpy()


def load(path: str, kind: str = 'auto'):
  """A .tflite file, a pushed version dir, or a Trainer model dir.

  kind 'auto'/'tflite': the int8 TFLite (what ships) found at <path>/model.tflite or
  <path>/tflite/model.tflite; 'savedmodel': the float SavedModel (<path> or <path>/saved_model).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if path.endswith('.tflite'):
    return TFLiteModel(path)
  if kind in ('auto', 'tflite'):
    for cand in (os.path.join(path, INT8), os.path.join(path, TFLITE_DIR, INT8)):
      if tf.io.gfile.exists(cand):
        return TFLiteModel(cand)
  if kind in ('auto', 'savedmodel'):
    for cand in (path, os.path.join(path, PUSHED_SAVED_MODEL)):
      if tf.io.gfile.exists(os.path.join(cand, 'saved_model.pb')):
        return SavedModel(cand)
  raise FileNotFoundError(f'no {kind} model at {path}')


def read_serve(model_dir: str) -> Optional[Dict]:
  """The decision thresholds saved with a model (serve.json), or None for older models."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for cand in (os.path.join(model_dir, SERVE), os.path.join(model_dir, TFLITE_DIR, SERVE)):
    if tf.io.gfile.exists(cand):
      with tf.io.gfile.GFile(cand) as f:
        return json.load(f)
  return None


def serve_of(model_path: str) -> Optional[Dict]:
  """serve.json of the model at `model_path` (a .tflite, a pushed version, a Trainer model
  or its saved_model/), or None."""
  where = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
  return read_serve(where) or read_serve(os.path.dirname(where.rstrip('/')))

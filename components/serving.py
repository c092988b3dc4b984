"""Running a trained carvision model the way clients do (scoring: components/scoring.py,
the report: components/report.py).

Shared by the TFLite gate (components/tflite_evaluator), the Pusher and
`carvision predict` / `carvision evaluate`. The contract (components/images.py): the whole
RGB photo, upright, bilinear-resized to the model's H x W, uint8 0..255; output =
probabilities in labels.txt order. A TFLite model on local files needs LiteRT, Pillow and
NumPy only: TensorFlow is imported for the SavedModel and for remote paths (gs://).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from carvision.components import files
from carvision.components import images
from carvision.components.names import PUSHED_SAVED_MODEL
from carvision.components.names import INT8, LABELS, SEEN_ADS, SERVE, TFLITE_DIR


@contextlib.contextmanager
def _runtime_info_silenced():
  """LiteRT's C++ runtime prints 'INFO: Created TensorFlow Lite XNNPACK delegate' on the
  process's stderr (no setting turns it off): drop its INFO lines, pass anything else on."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      for line in tmp.read().decode(errors='replace').splitlines():
        if line.strip() and not line.startswith('INFO: '):
          print(line, file=sys.stderr)


def read_labels(path: str) -> List[str]:
  return [line.rstrip('\r') for line in files.read(path).split('\n') if line.strip()]


def pixels(photo: bytes, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
  """uint8 [size, size, 3]: the contract's pixels of a photo file (components/images.py)."""
  return images.contract_pixels(photo, size, max_pixels)


class TFLiteModel:
  """An int8 (or fp16) TFLite classifier with its labels; one interpreter, batch of 1."""

  def __init__(self, path: str, labels: Optional[List[str]] = None, threads: Optional[int] = None):
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    self.content = files.read(path, 'rb')
    self.path = path
    with _runtime_info_silenced():
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
    """Photo files' bytes (JPEG, PNG, WebP) -> probabilities."""
    return self.predict_pixels(np.stack([pixels(j, self.size) for j in jpegs]))


class SavedModel:
  """The float SavedModel's `serving_default`: JPEG bytes in, probabilities out."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.path = path
    loaded = tf.saved_model.load(path)
    self.fn = loaded.signatures['serving_default']
    self.pixels_fn = loaded.signatures.get('serve_pixels')
    self.size = int(self.pixels_fn.structured_input_signature[1]['pixels'].shape[1]) if (
        self.pixels_fn is not None) else None
    for cand in (os.path.join(path, TFLITE_DIR, LABELS), os.path.join(path, '..', LABELS)):
      if files.exists(cand):
        self.labels = read_labels(cand)
        break
    else:
      raise FileNotFoundError(f'no labels.txt for the SavedModel at {path}')

  def predict_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
    """JPEG bytes through `serving_default` (decoding inside the graph)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return self.fn(images=tf.constant(list(jpegs)))['probabilities'].numpy()

  def predict_pixels(self, batch: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] (any photo format, decoded by components/images) -> probabilities."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return np.concatenate([self.pixels_fn(pixels=tf.constant(p[None]))['probabilities'].numpy()
                           for p in batch]) if len(batch) else np.zeros((0, len(self.labels)))


def load(path: str, kind: str = 'auto', threads: Optional[int] = None):
  """A .tflite file, a pushed version dir, or a Trainer model dir.

  kind 'auto'/'tflite': the int8 TFLite (what ships) found at <path>/model.tflite or
  <path>/tflite/model.tflite; 'savedmodel': the float SavedModel (<path> or <path>/saved_model).
  `threads`: the TFLite interpreter's (None: LiteRT's default).
  """
  if path.endswith('.tflite'):
    return TFLiteModel(path, threads=threads)
  if kind in ('auto', 'tflite'):
    for cand in (os.path.join(path, INT8), os.path.join(path, TFLITE_DIR, INT8)):
      if files.exists(cand):
        return TFLiteModel(cand, threads=threads)
  if kind in ('auto', 'savedmodel'):
    for cand in (path, os.path.join(path, PUSHED_SAVED_MODEL)):
      if files.exists(os.path.join(cand, 'saved_model.pb')):
        return SavedModel(cand)
  raise FileNotFoundError(f'no {kind} model at {path}')


def read_serve(model_dir: str) -> Optional[Dict]:
  """The decision thresholds saved with a model (serve.json), or None for older models."""
  for cand in (os.path.join(model_dir, SERVE), os.path.join(model_dir, TFLITE_DIR, SERVE)):
    if files.exists(cand):
      return json.loads(files.read(cand))
  return None


def seen_ads_of(model_path: str) -> Optional[Dict[str, set]]:
  """{'train': ad ids, 'validation': ad ids} the model at `model_path` learnt from or was
  chosen on (seen_ads.json), or None for a model exported without it: figures on these ads
  say nothing about photos the model has not seen."""
  where = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
  for d in (where, os.path.join(where, TFLITE_DIR), os.path.dirname(where.rstrip('/'))):
    cand = os.path.join(d, SEEN_ADS)
    if files.exists(cand):
      return {k: set(v) for k, v in json.loads(files.read(cand)).items()}
  return None


def all_seen(seen: Optional[Dict[str, set]]) -> set:
  """Every ad id of a seen_ads mapping (train, validation, inherited), empty for None."""
  return set().union(*seen.values()) if seen else set()


def serve_of(model_path: str) -> Optional[Dict]:
  """serve.json of the model at `model_path` (a .tflite, a pushed version, a Trainer model
  or its saved_model/), or None."""
  where = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
  return read_serve(where) or read_serve(os.path.dirname(where.rstrip('/')))

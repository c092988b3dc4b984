"""Warm start: a Trainer run that continues a previous carvision model.

The previous model is a Trainer output or a pushed version (its SavedModel), or the weights
file a pushed version carries (`warm_start.npz`: every weight in float16, no graph, about a
fifth of the SavedModel: what the repository's shipped model keeps for the continuous-training
path). Heads are mapped by label. The new model has seen what its source saw: the Trainer
writes the union of both into seen_ads.json, and the int8 gate fails a model that saw an ad
of the test split it is judged on (splits are hash buckets of the ad id, so a source of the
same pipeline, same `ingest.splits`, never saw a later run's test ads).
"""
from __future__ import annotations

import io
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components import names
from carvision.components import serving
from carvision.components.trainer import model as M

HEADS = (M.CLASS_OUT, M.MAKE_OUT)


def source(mc, base_model: Optional[str]) -> Optional[str]:
  """model.warm_start (a ModelConfig): `none`, `latest_blessed` (the resolver's model: TFX
  base_model; None on the first run) or a path."""
  ws = mc.warm_start or 'none'
  if ws == 'none':
    return None
  if ws == 'latest_blessed':
    return base_model or None
  return ws


def save_weights(full: keras.Model, path: str) -> None:
  """warm_start.npz: the backbone's weights in order, then each head's kernel and bias."""
  arrays = {f'backbone/{i:04d}': w.astype(np.float16)
            for i, w in enumerate(M.backbone_of(full).get_weights())}
  for head in HEADS:
    kernel, bias = full.get_layer('heads').get_layer(head).get_weights()
    arrays[f'{head}/kernel'], arrays[f'{head}/bias'] = kernel.astype(np.float16), bias
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buf.getvalue())


def _weights_file(path: str) -> Optional[str]:
  if path.endswith('.npz'):
    return path
  cand = os.path.join(path, names.WARM_START)
  return cand if tf.io.gfile.exists(cand) else None


def _saved_model_dir(path: str) -> str:
  cands = [path, os.path.join(path, names.SERVING_DIR), os.path.join(path, names.PUSHED_SAVED_MODEL)]
  src = next((c for c in cands if tf.io.gfile.exists(os.path.join(c, 'saved_model.pb'))), None)
  if src is None:
    raise FileNotFoundError(f'model.warm_start: no {names.WARM_START} and no SavedModel at {path}')
  return src


def _load(path: str) -> Tuple[str, List[np.ndarray], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
  """(where, backbone weights, {head: (kernel, bias)}) of the previous model."""
  npz = _weights_file(path)
  if npz:
    with tf.io.gfile.GFile(npz, 'rb') as f:
      data = np.load(io.BytesIO(f.read()))
      keys = sorted(k for k in data.files if k.startswith('backbone/'))
      backbone = [data[k].astype(np.float32) for k in keys]
      heads = {h: (data[f'{h}/kernel'].astype(np.float32), data[f'{h}/bias'].astype(np.float32))
               for h in HEADS}
    return npz, backbone, heads
  src = _saved_model_dir(path)
  prev = keras.models.load_model(src, compile=False)
  heads = {h: tuple(prev.get_layer('heads').get_layer(h).get_weights()) for h in HEADS}
  return src, M.backbone_of(prev).get_weights(), heads


def previous_vocabularies(path: str, src: str) -> Dict[str, Optional[List[str]]]:
  """The class and make vocabularies a previous model was trained with: labels.txt (in
  tflite/ beside a Trainer's SavedModel, or beside a pushed version's or a weights file),
  make_labels.txt likewise, else Transform's make vocabulary among the SavedModel's assets;
  None if unknown."""
  from carvision.components import features as F  # pylint: disable=g-import-not-at-top
  where = os.path.dirname(src) if src.endswith('.npz') else src
  out: Dict[str, Optional[List[str]]] = {}
  for head, fname, asset in ((M.CLASS_OUT, names.LABELS, F.vocab_name('class')),
                             (M.MAKE_OUT, names.MAKE_LABELS, F.vocab_name('make'))):
    cands = [os.path.join(where, names.TFLITE_DIR, fname), os.path.join(where, fname),
             os.path.join(path, fname), os.path.join(where, 'assets', asset)]
    found = next((c for c in cands if tf.io.gfile.exists(c)), None)
    out[head] = serving.read_labels(found) if found else None
  if out[M.CLASS_OUT] is None:
    raise FileNotFoundError(f'model.warm_start: no {names.LABELS} with {src}')
  return out


def seen_ads(src: str) -> Optional[Dict[str, set]]:
  """The previous model's seen_ads.json ({'train', 'validation'}: ad ids), None if it has none.
  A model warm-started from it has seen them too (the Trainer writes the union)."""
  return serving.seen_ads_of(src) or serving.seen_ads_of(os.path.join(src, names.SERVING_DIR))


def warm_start(full: keras.Model, path: str, vocab: Dict[str, List[str]]) -> Dict:
  """Starts `full` from a previous carvision model.

  The backbone must be the same architecture (weights match one to one). The heads are
  mapped by label, so a vocabulary that gained or lost classes (or makes) still starts
  from the previous model: a label in both keeps its row, a new label starts silent (zero
  weights, the lowest kept bias) and is learnt by the warm-start schedule, a dropped one is
  left out. Returns what was kept, added and dropped.
  """
  src, theirs, prev_heads = _load(path)
  prev_vocab = previous_vocabularies(path, src)
  ours = M.backbone_of(full)
  if [w.shape for w in theirs] != [w.shape for w in ours.get_weights()]:
    raise ValueError(f'model.warm_start: {src} has another architecture (backbone/size)')
  ours.set_weights(theirs)
  record = {'source': src}
  for head_name in HEADS:
    new_labels, old_labels = list(vocab[head_name]), prev_vocab[head_name]
    layer = full.get_layer('heads').get_layer(head_name)
    kernel, bias = layer.get_weights()
    if old_labels is None:  # an old model that did not record it: this head starts fresh
      record[head_name] = {'kept': 0, 'new': len(new_labels), 'dropped': None}
      continue
    old_kernel, old_bias = prev_heads[head_name]
    index = {label: i for i, label in enumerate(old_labels)}
    kept = [(j, index[label]) for j, label in enumerate(new_labels) if label in index]
    for j, i in kept:
      kernel[:, j], bias[j] = old_kernel[:, i], old_bias[i]
    # A new label starts silent (zero weights, the lowest kept bias): a random row would
    # take answers from the classes the model already knows until training moves it.
    for j, label in enumerate(new_labels):
      if label not in index:
        kernel[:, j], bias[j] = 0.0, float(old_bias.min())
    layer.set_weights([kernel, bias])
    record[head_name] = {'kept': len(kept),
                         'new': sorted(set(new_labels) - set(index))[:50],
                         'dropped': sorted(set(index) - set(new_labels))[:50]}
  return record

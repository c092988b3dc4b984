"""The Trainer's data: which files it may open, photos as batches, and the frozen network's
activations computed once and kept in a bounded store (memory, then disk)."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components import features as F
from carvision.components import images
from carvision.components.trainer import model as M


def check_inputs(train_files: List[str], validation_files: List[str]) -> Dict[str, List[str]]:
  """The files the Trainer may open, recorded on its output; a test-split file is refused.

  The gates judge the test split: a Trainer that read it (a mis-wired eval_args, an old
  two-split pipeline) would choose its weights on the figures it is judged by.
  """
  dirs = {'train': sorted({os.path.dirname(f) for f in train_files}),
          'validation': sorted({os.path.dirname(f) for f in validation_files})}
  for role, ds in dirs.items():
    for d in ds:
      if os.path.basename(d) != f'Split-{role}':
        raise ValueError(f'Trainer {role} input {d} is not a Split-{role} directory: the '
                         'Trainer reads train (fit) and validation (choices) only')
  if not train_files or not validation_files:
    raise ValueError(f'Trainer inputs: {len(train_files)} train and {len(validation_files)} '
                     'validation files; both splits need examples')
  return dirs


MAX_VIEWS = 64  # views of one photo told apart in seeds and keys (model.feature_views <= this)


def dataset(files: List[str], spec: Dict, size: int, batch: int, n_classes: int, n_makes: int,
            training: bool, repeat: bool = False, crop_prob: float = 0.0,
            decoded_size: Optional[int] = None, light: bool = False, seed: int = 7,
            view: int = 0, keyed: bool = False,
            exclude: Optional[np.ndarray] = None,
            relabel: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> tf.data.Dataset:
  """(uint8 photos, one-hot labels) batches of `files`.

  `decoded_size`: each photo is decoded once, bilinear-resized to that square (the model
  contract's squash, at the serving size) and kept in memory (`tf.data` cache); training
  views are then cropped and augmented from the cached pixels every epoch, so JPEG
  decoding stops competing with training. None: decoded from the JPEG every time
  (streamed; bounded memory at any size). Validation is cached the same way.

  Augmentation is stateless: a view is a function of (`seed`, `view`, the photo's p_hash)
  when each photo passes once (the cached stages' views: the same whatever order
  ExampleGen wrote the records in), of (`seed`, position in the stream) when repeating
  (every epoch other views). `keyed`: labels also carry 'key', the photo's hash and view,
  for an order-independent arrangement of cached activations. `exclude`: photo keys (the
  hash of the p_hash, as in 'key') left out, e.g. the photos of ads with doubted labels;
  `relabel`: (photo keys, class ids, make ids) trained with that class and make instead.
  """
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  if training and not decoded_size:
    ds = ds.shuffle(2048, seed=seed, reshuffle_each_iteration=True)
  ds = ds.map(lambda s: tf.io.parse_single_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
  cls_key, make_key = F.label_id('class'), F.label_id('make')
  ds = ds.filter(lambda f: tf.reshape(f[cls_key], [-1])[0] >= 0)
  boxed = training and crop_prob > 0
  named = F.P_HASH in spec

  def fields(f):
    jpeg = tf.reshape(f[F.IMAGE], [-1])[0]
    pixels = images.decode_tf(jpeg, decoded_size) if decoded_size else jpeg
    box = tf.stack([tf.reshape(f[k], [-1])[0] for k in F.BBOX]) if boxed else tf.zeros([4])
    known = tf.reshape(f[F.BBOX_KNOWN], [-1])[0] > 0 if boxed else tf.constant(False)
    photo = (tf.strings.to_hash_bucket_fast(tf.reshape(f[F.P_HASH], [-1])[0], 2**40)
             if named else tf.constant(-1, tf.int64))
    return (pixels, box, known, tf.reshape(f[cls_key], [-1])[0],
            tf.reshape(f[make_key], [-1])[0], photo)

  ds = ds.map(fields, num_parallel_calls=tf.data.AUTOTUNE)
  if exclude is not None and len(exclude):
    if not named:
      raise ValueError('excluding photos needs the p_hash feature in the examples')
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(np.asarray(exclude, np.int64)), tf.ones([len(exclude)], tf.int32)), 0)
    ds = ds.filter(lambda *e: table.lookup(e[5]) == 0)
  if relabel is not None and len(relabel[0]):
    if not named:
      raise ValueError('relabelling photos needs the p_hash feature in the examples')
    keys = tf.constant(np.asarray(relabel[0], np.int64))
    new = [tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        keys, tf.constant(np.asarray(v, np.int64))), -1) for v in relabel[1:]]

    def relabelled(pixels, box, known, cls, make, photo):
      c, m = new[0].lookup(photo), new[1].lookup(photo)
      return (pixels, box, known, tf.where(c >= 0, c, cls), tf.where(m >= 0, m, make), photo)
    ds = ds.map(relabelled, num_parallel_calls=tf.data.AUTOTUNE)
  if decoded_size:
    ds = ds.cache()
    if training:
      ds = ds.shuffle(1024, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()

  def to_xy(position, elem):
    pixels, box, known, cls, make, photo = elem
    if training:
      img = pixels if decoded_size else images.decode_full_tf(pixels)
      unit = photo if (named and not repeat) else position
      img = images.augment_tf(img, size, box=box if boxed else None,
                              crop_prob=tf.where(known, crop_prob, 0.0) if boxed else 0.0,
                              light=light, seed=tf.stack([tf.constant(seed, tf.int64),
                                                          unit * MAX_VIEWS + view]))
    elif not decoded_size:
      img = images.decode_tf(pixels, size)
    elif decoded_size != size:
      img = images.to_uint8(tf.image.resize(pixels, (size, size), method='bilinear'))
    else:
      img = pixels
    y = {M.CLASS_OUT: tf.one_hot(cls, n_classes), M.MAKE_OUT: tf.one_hot(make, n_makes)}
    if keyed:
      y['key'] = (photo if named else position) * MAX_VIEWS + view
    return img, y

  ds = ds.enumerate().map(to_xy, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


class ActivationStore:
  """Where cached activations live: in memory while the total fits `budget_mb`, else in
  float16 files on local disk (numpy memmaps, read back batch by batch), so the frozen
  network's activations of a data set of any size fit a bounded memory."""

  def __init__(self, budget_mb: float):
    self.budget = float(budget_mb) * 2**20
    self.used = 0.0
    self.spill_dir: Optional[str] = None  # a temporary directory, made on the first spill
    self.spilled = 0

  def allocate(self, shape, dtype=np.float16) -> np.ndarray:
    nbytes = float(np.prod(shape)) * np.dtype(dtype).itemsize
    if self.used + nbytes <= self.budget:
      self.used += nbytes
      return np.empty(shape, dtype)
    if self.spill_dir is None:
      self.spill_dir = tempfile.mkdtemp(prefix='carvision-activations-')
    os.makedirs(self.spill_dir, exist_ok=True)
    self.spilled += 1
    path = os.path.join(self.spill_dir, f'activations-{self.spilled}.npy')
    return np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=tuple(shape))

  def cleanup(self) -> None:
    if self.spilled and self.spill_dir:
      shutil.rmtree(self.spill_dir, ignore_errors=True)


def cached_features(lower: keras.Model, ds: tf.data.Dataset, dtype=np.float16, backbone: str = '',
                    count: Optional[int] = None, store: Optional[ActivationStore] = None):
  """Runs the frozen lower network once over `ds`; returns (activations, labels dict).

  Activations are kept as float16 to halve memory (feature maps of thousands of views);
  with `count` (examples in `ds`, an upper bound) and a `store`, they are written into an
  array the store allocates (memory or a disk memmap) instead of being concatenated.
  """
  f = tf.function(lambda x: lower(M.normalise(backbone, x), training=False))
  feats, cls, make, keys = [], [], [], []
  out, n = None, 0
  for x, y in ds:
    a = f(x).numpy().astype(dtype)
    if store is not None and count is not None:
      if out is None:
        out = store.allocate((count,) + a.shape[1:], dtype)
      out[n:n + len(a)] = a
      n += len(a)
    else:
      feats.append(a)
    cls.append(np.argmax(y[M.CLASS_OUT].numpy(), -1).astype(np.int32))
    make.append(np.argmax(y[M.MAKE_OUT].numpy(), -1).astype(np.int32))
    if 'key' in y:
      keys.append(y['key'].numpy())
  if not cls:
    raise ValueError('no examples with a known label')
  x_all = out[:n] if out is not None else np.concatenate(feats)
  labels = {M.CLASS_OUT: np.concatenate(cls), M.MAKE_OUT: np.concatenate(make)}
  if keys:  # the dataset was keyed: each row's photo and view (ArrayBatches' canonical order)
    labels['key'] = np.concatenate(keys)
  return x_all, labels


class ArrayBatches(keras.utils.Sequence):
  """Shuffled float32 batches from a float16 array, with one-hot (smoothable) labels.
  With `keys` (one per row, e.g. photo and view) the shuffle starts from the rows sorted by
  key: the batches are the same whatever order the rows were stored in."""

  def __init__(self, x, y, batch, n_out, shuffle, seed=7, keys=None, keep=None):
    super().__init__()
    self.x, self.batch, self.n_out, self.shuffle = x, batch, n_out, shuffle
    self.y = {k: v for k, v in y.items() if k in n_out}
    self.rng = np.random.default_rng(seed)
    self.order = np.arange(len(x)) if keys is None else np.argsort(keys, kind='stable')
    if keep is not None:  # a row mask: rows left out (photos of ads with doubted labels)
      self.order = self.order[np.asarray(keep, bool)[self.order]]
    self.on_epoch_end()

  def __len__(self):
    return -(-len(self.order) // self.batch)

  def __getitem__(self, i):
    idx = self.order[i * self.batch:(i + 1) * self.batch]
    ascending = np.argsort(idx)
    rows = np.empty((len(idx),) + self.x.shape[1:], np.float32)
    rows[ascending] = self.x[idx[ascending]]  # a memmap is read in file order, batched in ours
    ys = {k: np.eye(self.n_out[k], dtype=np.float32)[v[idx]] for k, v in self.y.items()}
    return rows, ys

  def on_epoch_end(self):
    if self.shuffle:
      self.rng.shuffle(self.order)

"""Trainer `run_fn`: staged EfficientNet-Lite fine-tuning that is practical on 2 CPU cores.

Stage `trainable: none` never runs the frozen backbone more than once per photo: its
pooled activations are computed once (plus a few augmented views) and only the heads
are trained on them. Later stages unfreeze the top blocks and train end to end on
augmented photos. Every choice (best epoch, stage roll-back, the warm-start bar) is made on
the validation split (TFX `eval_args`); the test split never reaches the Trainer.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from absl import logging

from components import features as F
from components import images
from components import names
from components.trainer import model as M
from components.trainer import export


def _files(patterns: List[str]) -> List[str]:
  out = []
  for p in patterns:
    out.extend(tf.io.gfile.glob(p if any(c in p for c in '*?[') else os.path.join(p, '*')))
  return sorted(out)


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


def dataset(files: List[str], spec: Dict, size: int, batch: int, n_classes: int, n_makes: int,
            training: bool, repeat: bool = False, crop_prob: float = 0.0,
            decoded_size: Optional[int] = None, light: bool = False) -> tf.data.Dataset:
  """(uint8 photos, one-hot labels) batches of `files`.

  `decoded_size`: each photo is decoded once, bilinear-resized to that square (the model
  contract's squash, at the serving size) and kept in memory (`tf.data` cache); training
  views are then cropped and augmented from the cached pixels every epoch, so JPEG
  decoding stops competing with training. None: decoded from the JPEG every time
  (streamed; bounded memory at any size). Validation is cached the same way.
  """
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  if training and not decoded_size:
    ds = ds.shuffle(2048, seed=7, reshuffle_each_iteration=True)
  ds = ds.map(lambda s: tf.io.parse_single_example(s, spec), num_parallel_calls=tf.data.AUTOTUNE)
  cls_key, make_key = F.label_id('class'), F.label_id('make')
  ds = ds.filter(lambda f: tf.reshape(f[cls_key], [-1])[0] >= 0)
  boxed = training and crop_prob > 0

  def fields(f):
    jpeg = tf.reshape(f[F.IMAGE], [-1])[0]
    pixels = images.decode_tf(jpeg, decoded_size) if decoded_size else jpeg
    box = tf.stack([tf.reshape(f[k], [-1])[0] for k in F.BBOX]) if boxed else tf.zeros([4])
    known = tf.reshape(f[F.BBOX_KNOWN], [-1])[0] > 0 if boxed else tf.constant(False)
    return (pixels, box, known, tf.reshape(f[cls_key], [-1])[0],
            tf.reshape(f[make_key], [-1])[0])

  ds = ds.map(fields, num_parallel_calls=tf.data.AUTOTUNE)
  if decoded_size:
    ds = ds.cache()
    if training:
      ds = ds.shuffle(1024, seed=7, reshuffle_each_iteration=True)

  def to_xy(pixels, box, known, cls, make):
    if training:
      img = pixels if decoded_size else images.decode_full_tf(pixels)
      img = images.augment_tf(img, size, box=box if boxed else None,
                              crop_prob=tf.where(known, crop_prob, 0.0) if boxed else 0.0,
                              light=light)
    elif not decoded_size:
      img = images.decode_tf(pixels, size)
    elif decoded_size != size:
      img = images.to_uint8(tf.image.resize(pixels, (size, size), method='bilinear'))
    else:
      img = pixels
    return img, {M.CLASS_OUT: tf.one_hot(cls, n_classes), M.MAKE_OUT: tf.one_hot(make, n_makes)}

  ds = ds.map(to_xy, num_parallel_calls=tf.data.AUTOTUNE)
  if repeat:
    ds = ds.repeat()
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


class ActivationStore:
  """Where cached activations live: in memory while the total fits `budget_mb`, else in
  float16 files on local disk (numpy memmaps, read back batch by batch), so the frozen
  network's activations of a data set of any size fit a bounded memory."""

  def __init__(self, budget_mb: float, spill_dir: Optional[str] = None):
    self.budget = float(budget_mb) * 2**20
    self.used = 0.0
    self.spill_dir = spill_dir
    self.spilled = 0

  def allocate(self, shape, dtype=np.float16) -> np.ndarray:
    nbytes = float(np.prod(shape)) * np.dtype(dtype).itemsize
    if self.used + nbytes <= self.budget:
      self.used += nbytes
      return np.empty(shape, dtype)
    import tempfile  # pylint: disable=g-import-not-at-top
    if self.spill_dir is None:
      self.spill_dir = tempfile.mkdtemp(prefix='carvision-activations-')
    os.makedirs(self.spill_dir, exist_ok=True)
    self.spilled += 1
    path = os.path.join(self.spill_dir, f'activations-{self.spilled}.npy')
    return np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=tuple(shape))

  def cleanup(self) -> None:
    if self.spilled and self.spill_dir:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(self.spill_dir, ignore_errors=True)


def cached_features(lower: keras.Model, ds: tf.data.Dataset, dtype=np.float16, backbone: str = '',
                    count: Optional[int] = None, store: Optional[ActivationStore] = None):
  """Runs the frozen lower network once over `ds`; returns (activations, labels dict).

  Activations are kept as float16 to halve memory (feature maps of thousands of views);
  with `count` (examples in `ds`, an upper bound) and a `store`, they are written into an
  array the store allocates (memory or a disk memmap) instead of being concatenated.
  """
  f = tf.function(lambda x: lower(M.normalise(backbone, x), training=False))
  feats, cls, make = [], [], []
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
  if not cls:
    raise ValueError('no examples with a known label')
  x_all = out[:n] if out is not None else np.concatenate(feats)
  return x_all, {M.CLASS_OUT: np.concatenate(cls), M.MAKE_OUT: np.concatenate(make)}


class ArrayBatches(keras.utils.Sequence):
  """Shuffled float32 batches from a float16 array, with one-hot (smoothable) labels."""

  def __init__(self, x, y, batch, n_out, shuffle, seed=7):
    super().__init__()
    self.x, self.y, self.batch, self.n_out, self.shuffle = x, y, batch, n_out, shuffle
    self.rng = np.random.default_rng(seed)
    self.order = np.arange(len(x))
    self.on_epoch_end()

  def __len__(self):
    return -(-len(self.x) // self.batch)

  def __getitem__(self, i):
    idx = np.sort(self.order[i * self.batch:(i + 1) * self.batch])
    ys = {k: np.eye(self.n_out[k], dtype=np.float32)[v[idx]] for k, v in self.y.items()}
    return self.x[idx].astype(np.float32), ys

  def on_epoch_end(self):
    if self.shuffle:
      self.rng.shuffle(self.order)


def _saved_model_dir(path: str) -> str:
  cands = [path, os.path.join(path, names.SERVING_DIR), os.path.join(path, names.PUSHED_SAVED_MODEL)]
  src = next((c for c in cands if tf.io.gfile.exists(os.path.join(c, 'saved_model.pb'))), None)
  if src is None:
    raise FileNotFoundError(f'model.warm_start: no SavedModel at {path}')
  return src


def previous_vocabularies(path: str, src: str) -> Dict[str, Optional[List[str]]]:
  """The class and make vocabularies a previous model was trained with: labels.txt (in
  tflite/ beside a Trainer's SavedModel, or beside a pushed version's), make_labels.txt
  likewise, else Transform's make vocabulary among the SavedModel's assets; None if unknown."""
  from components import serving  # pylint: disable=g-import-not-at-top
  out: Dict[str, Optional[List[str]]] = {}
  for head, fname, asset in ((M.CLASS_OUT, names.LABELS, F.vocab_name('class')),
                             (M.MAKE_OUT, names.MAKE_LABELS, F.vocab_name('make'))):
    cands = [os.path.join(src, names.TFLITE_DIR, fname), os.path.join(path, fname),
             os.path.join(src, 'assets', asset)]
    found = next((c for c in cands if tf.io.gfile.exists(c)), None)
    out[head] = serving.read_labels(found) if found else None
  if out[M.CLASS_OUT] is None:
    raise FileNotFoundError(f'model.warm_start: no {names.LABELS} with {src}')
  return out


def _backbone_of(model: keras.Model) -> keras.Model:
  head = model.get_layer('heads')
  return next(l for l in model.layers if isinstance(l, keras.Model) and l is not head)


def warm_start(full: keras.Model, path: str, vocab: Dict[str, List[str]]) -> Dict:
  """Starts `full` from a previous carvision model (a Trainer output or a pushed version).

  The backbone must be the same architecture (weights match one to one). The heads are
  mapped by label, so a vocabulary that gained or lost classes (or makes) still starts
  from the previous model: a label in both keeps its row, a new label keeps its fresh
  initialisation, a dropped one is left out. Returns what was kept, added and dropped.
  """
  src = _saved_model_dir(path)
  prev_vocab = previous_vocabularies(path, src)
  prev = keras.models.load_model(src, compile=False)
  theirs, ours = _backbone_of(prev), _backbone_of(full)
  if [w.shape for w in theirs.get_weights()] != [w.shape for w in ours.get_weights()]:
    raise ValueError(f'model.warm_start: {src} has another architecture (backbone/size)')
  ours.set_weights(theirs.get_weights())
  record = {'source': src}
  for head_name in (M.CLASS_OUT, M.MAKE_OUT):
    new_labels, old_labels = list(vocab[head_name]), prev_vocab[head_name]
    layer = full.get_layer('heads').get_layer(head_name)
    kernel, bias = layer.get_weights()
    if old_labels is None:  # an old model that did not record it: this head starts fresh
      record[head_name] = {'kept': 0, 'new': len(new_labels), 'dropped': None}
      continue
    old_kernel, old_bias = prev.get_layer('heads').get_layer(head_name).get_weights()
    index = {label: i for i, label in enumerate(old_labels)}
    kept = [(j, index[label]) for j, label in enumerate(new_labels) if label in index]
    for j, i in kept:
      kernel[:, j], bias[j] = old_kernel[:, i], old_bias[i]
    layer.set_weights([kernel, bias])
    record[head_name] = {'kept': len(kept),
                         'new': sorted(set(new_labels) - set(index))[:50],
                         'dropped': sorted(set(index) - set(new_labels))[:50]}
  return record


def warm_start_source(mc: Dict, base_model: Optional[str]) -> Optional[str]:
  """model.warm_start: `none`, `latest_blessed` (the resolver's model: TFX base_model; None
  on the first run) or a path."""
  ws = mc.get('warm_start') or 'none'
  if ws == 'none':
    return None
  if ws == 'latest_blessed':
    return base_model or None
  return ws


def bake_temperature(head: keras.Model, temperatures: Dict[str, float]) -> None:
  """softmax((xW + b) / T) == softmax(x (W / T) + b / T): the calibration lives in the weights,
  so every exported file returns calibrated probabilities."""
  for name, t in temperatures.items():
    layer = head.get_layer(name)
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / t, bias / t])


def validation_probabilities(full: keras.Model, ds: tf.data.Dataset, views):
  """({head: probabilities}, {head: true index}) of `full` on `ds`, as the exported model
  answers (test-time views included)."""
  probs = {M.CLASS_OUT: [], M.MAKE_OUT: []}
  truth = {M.CLASS_OUT: [], M.MAKE_OUT: []}
  for x, y in ds:
    out = M.predict_views(full, x, views)
    for k in probs:
      probs[k].append(out[k].numpy())
      truth[k].append(np.argmax(y[k].numpy(), -1))
  return ({k: np.concatenate(v) for k, v in probs.items()},
          {k: np.concatenate(v) for k, v in truth.items()})


def calibrate(full: keras.Model, probs: Dict, truth: Dict) -> Dict:
  """Fits a temperature per head on the validation split's probabilities and bakes it in;
  returns T, the validation ECE before/after, and the calibrated probabilities."""
  from components import calibration  # pylint: disable=g-import-not-at-top
  record = {k: calibration.temperature_for(probs[k], truth[k]) for k in probs}
  bake_temperature(full.get_layer('heads'), {k: r['temperature'] for k, r in record.items()})
  # softmax(z / T) == normalise(p ** (1 / T)): the baked model's answers, without a second pass
  calibrated = {}
  for k, p in probs.items():
    z = np.log(np.clip(p.astype(np.float64), 1e-12, 1.0)) / record[k]['temperature']
    calibrated[k] = calibration.softmax(z)
  return {'split': 'validation', **record}, calibrated


def serve_thresholds(serve_cfg: Dict, probs: np.ndarray, truth: np.ndarray,
                     labels: List[str]) -> Dict:
  """The class / make thresholds of the decision: configured numbers, else chosen on the
  validation split for `serve.target_precision` (components/decision)."""
  from components import decision  # pylint: disable=g-import-not-at-top
  target = float(serve_cfg.get('target_precision', 0.95))
  chosen = decision.choose_thresholds(probs, labels, truth, target)
  out = {'target_precision': target, 'validation_photos': chosen['photos'], 'chosen_on': {}}
  for key in ('class_min_confidence', 'make_min_confidence'):
    fixed = serve_cfg.get(key)
    out[key] = float(fixed) if fixed is not None else chosen[key]
    out['chosen_on'][key] = 'config' if fixed is not None else 'validation'
  out['validation'] = decision.evaluate(probs, labels, truth, out['class_min_confidence'],
                                        out['make_min_confidence'], target).get('decision')
  return out


def _compile(m: keras.Model, schedule, smoothing: float):
  m.compile(
      optimizer=keras.optimizers.Adam(schedule),
      loss={M.CLASS_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
            M.MAKE_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)},
      loss_weights={M.CLASS_OUT: 1.0, M.MAKE_OUT: 0.3},
      metrics={M.CLASS_OUT: [keras.metrics.CategoricalAccuracy(name='top1'),
                             keras.metrics.TopKCategoricalAccuracy(5, name='top5')],
               M.MAKE_OUT: [keras.metrics.CategoricalAccuracy(name='top1')]})


def run_fn(fn_args):
  """TFX Trainer entry point (GenericExecutor): the same code on a CPU, GPUs or a TPU."""
  from components.trainer import distribute  # pylint: disable=g-import-not-at-top
  cfg = json.loads(fn_args.custom_config['config'])
  strategy = distribute.set_up(cfg['model'].get('distribute') or 'auto')
  with strategy.scope():
    _train(fn_args, cfg, strategy.num_replicas_in_sync)


def _train(fn_args, cfg, replicas: int = 1):
  t0 = time.time()
  mc = cfg['model']
  keras.utils.set_random_seed(int(mc.get('seed', 7)))
  from components.trainer import distribute  # pylint: disable=g-import-not-at-top
  size = int(mc['image_size'])
  # batch_size is per replica; learning rates scale with the replicas (distribute.scaled)
  batch, lr_scale = distribute.scaled(int(mc['batch_size']), 1.0, replicas)
  tft_out = tft.TFTransformOutput(fn_args.transform_output)
  n_classes = tft_out.vocabulary_size_by_name(F.vocab_name('class'))
  n_makes = tft_out.vocabulary_size_by_name(F.vocab_name('make'))
  spec = tft_out.transformed_feature_spec()
  # eval_files are the validation split (Trainer eval_args): what chooses, never what judges.
  train_files, eval_files = _files(fn_args.train_files), _files(fn_args.eval_files)
  opened = check_inputs(train_files, eval_files)
  logging.info('classes=%d makes=%d train files=%s', n_classes, n_makes, train_files)

  base = M.backbone(mc)
  n_feat = int(base.output.shape[-1])
  head = M.heads(n_feat, n_classes, n_makes, float(mc['dropout']))
  full = M.classifier(base, head, size)
  started_from = None
  source = warm_start_source(mc, getattr(fn_args, 'base_model', None))
  if source:
    started_from = warm_start(full, source, {M.CLASS_OUT: export.labels(tft_out, 'class'),
                                             M.MAKE_OUT: export.labels(tft_out, 'make')})
    logging.info('warm start: %s', started_from)
  tb = keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, write_graph=False)
  history = {}
  smoothing = float(mc['label_smoothing'])
  patience = int(mc['early_stopping_patience'])

  def stop(stage):
    p = stage.get('patience')
    return keras.callbacks.EarlyStopping(monitor='val_class_top1', mode='max',
                                         patience=patience if p is None else int(p),
                                         restore_best_weights=True)

  def data(files, training, repeat=False, at=size, light=False, cached=False):
    return dataset(files, spec, at, batch, n_classes, n_makes, training=training, repeat=repeat,
                   crop_prob=float(mc.get('bbox_crop_prob') or 0.0),
                   decoded_size=size if cached else None, light=light)

  n_train = sum(1 for _ in tf.data.TFRecordDataset(train_files, compression_type='GZIP'))
  n_val = sum(1 for _ in tf.data.TFRecordDataset(eval_files, compression_type='GZIP'))
  # Decoded photos (uint8, serving size) kept in memory only while they fit the budget.
  photo_mb = (n_train + n_val) * size * size * 3 / 2**20
  keep_photos = photo_mb <= float(mc.get('photo_cache_mb', 0) or 0)
  logging.info('decoded photos %.0f MB: %s', photo_mb, 'kept in memory' if keep_photos else
               'over model.photo_cache_mb: decoded every epoch')
  validation = data(eval_files, False, cached=keep_photos)  # one dataset: its cache is reused
  # A warm start continues a trained model: the short schedule when one is configured.
  stages = mc['warm_start_stages'] if source and mc.get('warm_start_stages') else mc['stages']
  # Cached stages (frozen, or top blocks with `cached: true`) share one pass of the
  # frozen lower network over 1 clean + (feature_views - 1) augmented views of each photo.
  cached_tops = [int(st.get('top_blocks', 2)) for st in stages
                 if st['trainable'] == 'top_blocks' and st.get('cached')]
  upper = lower = None
  cache = None
  n_out = {M.CLASS_OUT: n_classes, M.MAKE_OUT: n_makes}

  def build_cache():
    nonlocal lower, upper
    ts = time.time()
    M.set_trainable(base, 'none')
    if cached_tops:
      if M.raw_pixel_input(mc['backbone']):
        raise ValueError('cached top_blocks stages need an EfficientNet-Lite backbone; for '
                         f"{mc['backbone']} use `cached: false` (end to end)")
      lower, upper = M.el.split(base, mc['backbone'], max(cached_tops))
    else:
      lower = base
    n_views = int(mc['feature_views'])
    chained = data(train_files, False)
    for _ in range(n_views - 1):
      chained = chained.concatenate(data(train_files, True))
    # One array for all views, in memory up to model.activation_cache_mb, else on disk.
    store = ActivationStore(float(mc.get('activation_cache_mb', 4096)))
    xtr, ytr = cached_features(lower, chained, backbone=mc['backbone'],
                               count=n_train * n_views, store=store)
    xev, yev = cached_features(lower, validation, backbone=mc['backbone'], count=n_val,
                               store=store)
    logging.info('cached activations: train %s validation %s (%.0f MB, %s) in %.1fs', xtr.shape,
                 xev.shape, (xtr.nbytes + xev.nbytes) / 2**20,
                 'on disk' if store.spilled else 'in memory', time.time() - ts)
    return {'maps': (xtr, ytr, xev, yev), 'seconds': time.time() - ts, 'store': store}

  def pooled(c):
    """Frozen-stage inputs: pooled features (through the frozen upper part when split)."""
    if 'pooled' not in c:
      xtr, ytr, xev, yev = c['maps']
      if upper is None:
        c['pooled'] = (xtr, ytr, xev, yev)
      else:
        M.set_trainable(upper, 'none')
        f = tf.function(lambda x: upper(x, training=False))

        def run(a):
          out = None
          for i in range(0, len(a), 256):
            y = f(a[i:i + 256].astype(np.float32)).numpy()
            if out is None:
              out = c['store'].allocate((len(a), y.shape[-1]), np.float16)
            out[i:i + len(y)] = y
          return out
        c['pooled'] = (run(xtr), ytr, run(xev), yev)
    return c['pooled']

  best = -1.0  # best validation top-1 so far; a stage that does not beat it is rolled back
  if started_from:
    _compile(full, 1e-4, smoothing)
    best = full.evaluate(validation, return_dict=True, verbose=0)['class_top1']
    started_from['validation_top1'] = float(best)
  for stage in stages:
    name, epochs = stage['name'], int(stage['epochs'])
    ts = time.time()
    before = full.get_weights()
    cached_stage = stage['trainable'] == 'none' or (
        stage['trainable'] == 'top_blocks' and stage.get('cached'))
    if cached_stage and cache is None:
      cache = build_cache()
    if stage['trainable'] == 'none':
      xtr, ytr, xev, yev = pooled(cache)
      train_seq = ArrayBatches(xtr, ytr, batch, n_out, shuffle=True)
      val = ArrayBatches(xev, yev, 256, n_out, shuffle=False)
      steps = len(train_seq) * epochs
      _compile(head, M.WarmupCosine(stage['learning_rate'] * lr_scale, steps, steps // 10), smoothing)
      h = head.fit(train_seq, epochs=epochs, validation_data=val, callbacks=[stop(stage), tb],
                   verbose=2)
    elif cached_stage:
      # Top blocks + heads trained on cached lower activations; copied back afterwards.
      xtr, ytr, xev, yev = cache['maps']
      M.set_trainable(upper, 'top_blocks', int(stage.get('top_blocks', 2)))
      cache.pop('pooled', None)  # the upper part changes: pooled features go stale
      inp = keras.Input(xtr.shape[1:], name='activations')
      top = keras.Model(inp, M.named(head(upper(inp))), name='top')
      train_seq = ArrayBatches(xtr, ytr, batch, n_out, shuffle=True)
      steps = len(train_seq) * epochs
      _compile(top, M.WarmupCosine(stage['learning_rate'] * lr_scale, steps, steps // 10), smoothing)
      h = top.fit(train_seq, epochs=epochs, validation_data=ArrayBatches(
          xev, yev, 256, n_out, shuffle=False), callbacks=[stop(stage), tb], verbose=2)
      M.el.copy_weights(upper, base)
    else:
      M.set_trainable(base, stage['trainable'], int(stage.get('top_blocks', 2)))
      at = int(stage.get('image_size') or size)
      if at != size and full.input_shape[1] is not None:
        raise ValueError(f'stage {name}: image_size {at} needs a backbone of any input size '
                         f"(EfficientNet-Lite); {mc['backbone']} is built at {size}")
      per_epoch = max(1, n_train // batch)
      _compile(full, M.WarmupCosine(stage['learning_rate'] * lr_scale, per_epoch * epochs,
                                      per_epoch // 2),
               smoothing)
      train = data(train_files, True, repeat=True, at=at, cached=keep_photos,
                   light=stage.get('augment') == 'light')
      h = full.fit(train, steps_per_epoch=per_epoch, epochs=epochs, validation_data=validation,
                   callbacks=[stop(stage), tb], verbose=2)
    history[name] = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    if not cached_stage:
      history[name]['image_size'] = at
    history[name]['seconds'] = time.time() - ts
    stage_best = max(h.history.get('val_class_top1', [0.0]))
    if stage_best < best:
      full.set_weights(before)
      if upper is not None:
        M.el.copy_weights(base, upper)
      history[name]['rolled_back'] = True
      logging.info('stage %s: best validation top-1 %.4f < %.4f before it; weights restored',
                   name, stage_best, best)
    best = max(best, stage_best)
    logging.info('stage %s done in %.1fs: %s', name, time.time() - ts, history[name])
  history['decoded_photos_in_memory'] = keep_photos
  if cache is not None:
    history['cache_seconds'] = cache['seconds']
    history['activations_on_disk'] = bool(cache['store'].spilled)
    cache['store'].cleanup()
    cache = None

  # Final figures of the restored model on the validation split (Keras, float).
  _compile(full, 1e-4, smoothing)
  final = full.evaluate(validation, return_dict=True, verbose=0)
  logging.info('float model on the validation split: %s', final)
  calibrated = None
  probs, truth = validation_probabilities(full, validation,
                                          M.parse_views(mc.get('serving_views') or ['full']))
  if mc.get('calibrate', True):
    calibrated, probs = calibrate(full, probs, truth)
    logging.info('calibration: %s', calibrated)
  serve = serve_thresholds(cfg.get('serve') or {}, probs[M.CLASS_OUT], truth[M.CLASS_OUT],
                           export.labels(tft_out, 'class'))
  logging.info('decision thresholds: %s', serve)
  export.export_all(full, tft_out, fn_args, cfg, history={
      'stages': history, 'validation': final, 'warm_start': started_from, 'inputs': opened,
      'calibration': calibrated, 'serve': serve,
      'train_seconds': time.time() - t0})

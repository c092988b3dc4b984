"""Trainer `run_fn`: staged EfficientNet-Lite fine-tuning that is practical on 2 CPU cores.

Stage `trainable: none` never runs the frozen backbone more than once per photo: its
pooled activations are computed once (plus a few augmented views) and only the heads
are trained on them. Later stages unfreeze the top blocks and train end to end on
augmented photos. Every choice (best epoch, stage roll-back, the warm-start bar) is made on
the validation split (TFX `eval_args`); the test split never reaches the Trainer.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from absl import logging

from components import features as F
from components import files as files_lib
from components import images
from components import names
from components.trainer import model as M
from components.trainer import config as C
from components.trainer import export
from components.trainer import resume


class Progress(keras.callbacks.Callback):
  """One line per epoch (at most one each 10 s, and the last): the stage, epoch i/n,
  validation top-1, and the time left in the stage."""

  def __init__(self, stage_name: str, epochs: int, initial_epoch: int = 0, every_s: float = 10.0):
    super().__init__()
    self.name, self.epochs, self.first, self.every_s = stage_name, epochs, initial_epoch, every_s
    self.t0 = self.last = time.time()

  def on_train_begin(self, logs=None):
    self.t0 = self.last = time.time()

  def on_epoch_end(self, epoch, logs=None):
    from components.progress import duration, say  # pylint: disable=g-import-not-at-top
    now = time.time()
    done = epoch + 1
    last = done >= self.epochs or self.model.stop_training
    if not last and now - self.last < self.every_s:
      return
    self.last = now
    per = (now - self.t0) / max(1, done - self.first)
    val = (logs or {}).get('val_class_top1')
    left = 'stopping early' if self.model.stop_training and done < self.epochs else (
        f'about {duration(per * (self.epochs - done))} left in the stage' if not last else 'stage done')
    say(f'Trainer: stage {self.name} epoch {done}/{self.epochs}'
        + (f', validation top-1 {val:.3f}' if val is not None else '')
        + f', {duration(per)} an epoch, {left}')


class _History:  # pylint: disable=too-few-public-methods
  """What a stage returns: its per-epoch history (as keras.callbacks.History has it)."""

  def __init__(self, history: Dict):
    self.history = history


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
            view: int = 0, keyed: bool = False) -> tf.data.Dataset:
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
  for an order-independent arrangement of cached activations.
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

  def __init__(self, x, y, batch, n_out, shuffle, seed=7, keys=None):
    super().__init__()
    self.x, self.batch, self.n_out, self.shuffle = x, batch, n_out, shuffle
    self.y = {k: v for k, v in y.items() if k in n_out}
    self.rng = np.random.default_rng(seed)
    self.order = np.arange(len(x)) if keys is None else np.argsort(keys, kind='stable')
    self.on_epoch_end()

  def __len__(self):
    return -(-len(self.x) // self.batch)

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
  from the previous model: a label in both keeps its row, a new label starts silent (zero
  weights, the lowest kept bias) and is learnt by the warm-start schedule, a dropped one is
  left out. Returns what was kept, added and dropped.
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


def warm_start_source(mc, base_model: Optional[str]) -> Optional[str]:
  """model.warm_start (a ModelConfig): `none`, `latest_blessed` (the resolver's model: TFX
  base_model; None on the first run) or a path."""
  ws = mc.warm_start or 'none'
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


def serve_thresholds(serve_cfg, probs: np.ndarray, truth: np.ndarray,
                     labels: List[str]) -> Dict:
  """The class / make thresholds of the decision: configured numbers, else chosen on the
  validation split for `serve.target_precision` (components/decision); `serve_cfg`: the typed
  components.trainer.config.ServeConfig."""
  from components import decision  # pylint: disable=g-import-not-at-top
  target = float(serve_cfg.target_precision)
  chosen = decision.choose_thresholds(probs, labels, truth, target)
  out = {'target_precision': target, 'validation_photos': chosen['photos'], 'chosen_on': {}}
  for key in ('class_min_confidence', 'make_min_confidence'):
    fixed = getattr(serve_cfg, key)
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
  """TFX Trainer entry point (GenericExecutor): orchestration only. The same code on a CPU,
  GPUs or a TPU (model.distribute); the stages are the configured schedule, each run by the
  function of its kind and rolled back when validation says it did not help."""
  from components.trainer import distribute  # pylint: disable=g-import-not-at-top
  from components.trainer import config as trainer_config  # pylint: disable=g-import-not-at-top
  cfg = trainer_config.trainer_config_from_json(fn_args.custom_config['config'])
  strategy = distribute.set_up(cfg.model.distribute)
  with strategy.scope():
    run = Training(fn_args, cfg, strategy.num_replicas_in_sync)
    run.start()
    for index, stage in enumerate(run.stages):
      run.stage(stage, index)
    run.finish()


class Training:
  """One Trainer run: its inputs, the model, the shared caches and the history. The stage
  kinds: `fit_heads` (frozen network: heads on pooled cached activations), `fit_cached_top`
  (top blocks on cached lower activations), `fit_end_to_end` (photos through the network)."""

  def __init__(self, fn_args, cfg, replicas: int = 1):
    from components.trainer import distribute  # pylint: disable=g-import-not-at-top
    self.t0 = time.time()
    self.fn_args, self.cfg, self.mc = fn_args, cfg, cfg.model
    keras.utils.set_random_seed(self.mc.seed)
    self.size = self.mc.image_size
    # batch_size is per replica; learning rates scale with the replicas (distribute.scaled)
    self.batch, self.lr_scale = distribute.scaled(self.mc.batch_size, 1.0, replicas)
    self.tft_out = tft.TFTransformOutput(fn_args.transform_output)
    self.n_classes = self.tft_out.vocabulary_size_by_name(F.vocab_name('class'))
    self.n_makes = self.tft_out.vocabulary_size_by_name(F.vocab_name('make'))
    self.n_out = {M.CLASS_OUT: self.n_classes, M.MAKE_OUT: self.n_makes}
    self.spec = self.tft_out.transformed_feature_spec()
    # eval_files are the validation split (Trainer eval_args): what chooses, never what judges.
    self.train_files = files_lib.expand(fn_args.train_files)
    self.eval_files = files_lib.expand(fn_args.eval_files)
    self.opened = check_inputs(self.train_files, self.eval_files)
    logging.info('classes=%d makes=%d train files=%s', self.n_classes, self.n_makes,
                 self.train_files)
    self.base = M.backbone(self.mc.backbone, self.mc.weights, self.mc.image_size)
    self.head = M.heads(int(self.base.output.shape[-1]), self.n_classes, self.n_makes,
                        self.mc.dropout)
    self.full = M.classifier(self.base, self.head, self.size)
    self.tb = keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, write_graph=False)
    self.history: Dict = {}
    self.cache = None
    self.upper = self.lower = None
    self.best = -1.0  # best validation top-1 so far; a stage that does not beat it is rolled back
    self.started_from = None
    self.source = warm_start_source(self.mc, getattr(fn_args, 'base_model', None))
    # A warm start continues a trained model: the short schedule when one is configured.
    self.stages = (self.mc.warm_start_stages if self.source and self.mc.warm_start_stages
                   else self.mc.stages)
    # Checkpoints under the pipeline root, keyed by what decides the result (resume.py).
    custom = getattr(fn_args, 'custom_config', None) or {}
    self.ckpt = resume.Checkpoints(custom.get('resume_dir'), resume.run_key(
        custom.get('config', ''), [*self.train_files, *self.eval_files, fn_args.transform_output,
                                   self.source or '']), self.mc.checkpoint_every_s)
    self.done, self.resumed, self.seconds_before, self.attempt = 0, None, 0.0, 1

  # --- data ---------------------------------------------------------------------------

  def data(self, files, training, repeat=False, at=None, light=False, cached=False, view=0,
           keyed=False):
    return dataset(files, self.spec, at or self.size, self.batch, self.n_classes, self.n_makes,
                   training=training, repeat=repeat, crop_prob=self.mc.bbox_crop_prob,
                   decoded_size=self.size if cached else None, light=light, seed=self.mc.seed,
                   view=view, keyed=keyed)

  def start(self) -> None:
    """Counts the splits, sizes the photo cache, warm-starts when configured."""
    self.n_train = sum(1 for _ in tf.data.TFRecordDataset(self.train_files, compression_type='GZIP'))
    self.n_val = sum(1 for _ in tf.data.TFRecordDataset(self.eval_files, compression_type='GZIP'))
    # Decoded photos (uint8, serving size) kept in memory only while they fit the budget.
    photo_mb = (self.n_train + self.n_val) * self.size * self.size * 3 / 2**20
    self.keep_photos = photo_mb <= self.mc.photo_cache_mb
    logging.info('decoded photos %.0f MB: %s', photo_mb, 'kept in memory' if self.keep_photos
                 else 'over model.photo_cache_mb: decoded every epoch')
    self.validation = self.data(self.eval_files, False, cached=self.keep_photos)  # one cache, reused
    if self.source:
      self.started_from = warm_start(self.full, self.source, {
          M.CLASS_OUT: export.labels(self.tft_out, 'class'),
          M.MAKE_OUT: export.labels(self.tft_out, 'make')})
      _compile(self.full, 1e-4, self.mc.label_smoothing)
      self.best = self.full.evaluate(self.validation, return_dict=True, verbose=0)['class_top1']
      self.started_from['validation_top1'] = float(self.best)
      logging.info('warm start: %s', self.started_from)
    self.resumed = self.ckpt.latest()
    if self.resumed:  # a stopped Trainer of this very run: its finished stages are kept
      if self.resumed.get('done_path'):
        resume.Checkpoints.restore(self.resumed['done_path'], self.full)
      self.done, self.best = int(self.resumed['done']), float(self.resumed['best'])
      self.history = self.resumed['history']
      self.seconds_before = float(self.resumed['seconds'])
      self.attempt = int(self.resumed.get('attempt', 1)) + 1
      mid = self.resumed.get('stage') or {}
      self.history['resumed'] = self.history.get('resumed', []) + [
          {'attempt': self.attempt, 'stages_done': self.done, 'stage_epoch': mid.get('epoch')}]
      logging.info('resuming from %s: %d stages done%s', self.resumed['path'], self.done,
                   f", stage {mid['index']} after epoch {mid['epoch']}" if mid else '')

  def state(self) -> Dict:
    """What a checkpoint carries besides the weights (resume.py)."""
    return {'done': self.done, 'best': float(self.best), 'history': self.history,
            'seconds': self.seconds_before + time.time() - self.t0, 'attempt': self.attempt}

  def _mid_stage(self, index: int) -> Optional[Dict]:
    mid = (self.resumed or {}).get('stage')
    return {**mid, 'path': self.resumed['path']} if mid and mid['index'] == index else None

  def _stop(self, stage, mid: Optional[Dict] = None):
    patience = self.mc.early_stopping_patience if stage.patience is None else stage.patience
    return resume.ResumableStop(
        restored=mid['stop'] if mid else None,
        best_weights=resume.Checkpoints.best_weights(mid['path']) if mid else None,
        monitor='val_class_top1', mode='max', patience=patience, restore_best_weights=True)

  def _cached_tops(self) -> List[int]:
    return [st.top_blocks for st in self.stages if st.kind == C.CACHED_TOP]

  def _build_cache(self) -> Dict:
    """One pass of the frozen lower network over 1 clean + (feature_views - 1) augmented
    views of each training photo and over validation, shared by the cached stages; in
    memory up to model.activation_cache_mb, else on disk."""
    ts = time.time()
    backbone = self.mc.backbone
    M.set_trainable(self.base, 'none')
    tops = self._cached_tops()
    if tops:
      if M.raw_pixel_input(backbone):
        raise ValueError('cached top_blocks stages need an EfficientNet-Lite backbone; for '
                         f'{backbone} use `cached: false` (end to end)')
      self.lower, self.upper = M.el.split(self.base, backbone, max(tops))
    else:
      self.lower = self.base
    views = self.mc.feature_views
    chained = self.data(self.train_files, False, keyed=True)
    for v in range(1, views):
      chained = chained.concatenate(self.data(self.train_files, True, view=v, keyed=True))
    store = ActivationStore(self.mc.activation_cache_mb)
    xtr, ytr = cached_features(self.lower, chained, backbone=backbone,
                               count=self.n_train * views, store=store)
    xev, yev = cached_features(self.lower, self.validation, backbone=backbone, count=self.n_val,
                               store=store)
    logging.info('cached activations: train %s validation %s (%.0f MB, %s) in %.1fs', xtr.shape,
                 xev.shape, (xtr.nbytes + xev.nbytes) / 2**20,
                 'on disk' if store.spilled else 'in memory', time.time() - ts)
    return {'maps': (xtr, ytr, xev, yev), 'seconds': time.time() - ts, 'store': store}

  def _pooled(self):
    """Frozen-stage inputs: pooled features (through the frozen upper part when split)."""
    c = self.cache
    if 'pooled' not in c:
      xtr, ytr, xev, yev = c['maps']
      if self.upper is None:
        c['pooled'] = (xtr, ytr, xev, yev)
      else:
        M.set_trainable(self.upper, 'none')
        f = tf.function(lambda x: self.upper(x, training=False))

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

  def _schedule(self, stage, steps: int, warmup: int):
    return M.WarmupCosine(stage.learning_rate * self.lr_scale, steps, warmup)

  # --- the stage kinds ----------------------------------------------------------------

  def fit_heads(self, stage):
    """Frozen network: the heads alone on pooled activations (linear probe)."""
    xtr, ytr, xev, yev = self._pooled()
    train = ArrayBatches(xtr, ytr, self.batch, self.n_out, shuffle=True, seed=self.mc.seed,
                         keys=ytr.get('key'))
    steps = len(train) * stage.epochs
    _compile(self.head, self._schedule(stage, steps, steps // 10), self.mc.label_smoothing)
    return self.head.fit(train, epochs=stage.epochs, validation_data=ArrayBatches(
        xev, yev, 256, self.n_out, shuffle=False), callbacks=[self._stop(stage), self.tb, Progress(stage.name, stage.epochs)],
        verbose=0)

  def fit_cached_top(self, stage):
    """Top blocks + heads on cached lower activations; copied back into the backbone."""
    xtr, ytr, xev, yev = self.cache['maps']
    M.set_trainable(self.upper, 'top_blocks', stage.top_blocks)
    self.cache.pop('pooled', None)  # the upper part changes: pooled features go stale
    inp = keras.Input(xtr.shape[1:], name='activations')
    top = keras.Model(inp, M.named(self.head(self.upper(inp))), name='top')
    train = ArrayBatches(xtr, ytr, self.batch, self.n_out, shuffle=True, seed=self.mc.seed,
                         keys=ytr.get('key'))
    steps = len(train) * stage.epochs
    _compile(top, self._schedule(stage, steps, steps // 10), self.mc.label_smoothing)
    h = top.fit(train, epochs=stage.epochs, validation_data=ArrayBatches(
        xev, yev, 256, self.n_out, shuffle=False), callbacks=[self._stop(stage), self.tb, Progress(stage.name, stage.epochs)],
        verbose=0)
    M.el.copy_weights(self.upper, self.base)
    return h

  def fit_end_to_end(self, stage, index: int = 0):
    """Photos through the network, the chosen blocks trainable, at the stage's size
    (FixRes: a lower training size) with standard or light augmentation; checkpointed after
    epochs and, when a checkpoint of this stage exists, continued from it."""
    M.set_trainable(self.base, stage.trainable, stage.top_blocks)
    at = stage.image_size or self.size
    if at != self.size and self.full.input_shape[1] is not None:
      raise ValueError(f'stage {stage.name}: image_size {at} needs a backbone of any input '
                       f'size (EfficientNet-Lite); {self.mc.backbone} is built at {self.size}')
    per_epoch = max(1, self.n_train // self.batch)
    _compile(self.full, self._schedule(stage, per_epoch * stage.epochs, per_epoch // 2),
             self.mc.label_smoothing)
    mid = self._mid_stage(index)
    stop = self._stop(stage, mid)
    saver = resume.EpochCheckpoint(self.ckpt, self.state, index, stage.epochs, stop,
                                   mid['history'] if mid else None)
    if mid and (mid['stopped'] or mid['epoch'] >= stage.epochs):
      if stop._restored_weights is not None:  # pylint: disable=protected-access
        self.full.set_weights(stop._restored_weights)  # what on_train_end would have done
      return _History(dict(saver.history, image_size=at))
    if mid:
      self.full.optimizer.build(self.full.trainable_variables)
      resume.Checkpoints.restore(mid['path'], self.full, self.full.optimizer)
    train = self.data(self.train_files, True, repeat=True, at=at, cached=self.keep_photos,
                      light=stage.augment == 'light')
    self.full.fit(train, steps_per_epoch=per_epoch, epochs=stage.epochs,
                  initial_epoch=mid['epoch'] if mid else 0, validation_data=self.validation,
                  callbacks=[stop, saver, self.tb,
                             Progress(stage.name, stage.epochs, mid['epoch'] if mid else 0)],
                  verbose=0)
    return _History(dict(saver.history, image_size=at))

  def stage(self, stage, index: int = 0) -> None:
    """Runs one stage with the function of its kind; rolls it back if its best validation
    top-1 is below the best before it. A stage a stopped run finished is not run again."""
    from components.progress import say  # pylint: disable=g-import-not-at-top
    if index < self.done:
      say(f'Trainer: stage {stage.name} finished before the stop: kept')
      return
    say(f'Trainer: stage {index + 1}/{len(self.stages)} {stage.name} ({stage.epochs} epochs, '
        + ('heads' if stage.trainable == 'none' else f'{stage.trainable} {stage.top_blocks}'
           if stage.trainable == 'top_blocks' else stage.trainable)
        + (f' at {stage.image_size} px' if stage.image_size else '') + ')')
    ts = time.time()
    before = self.full.get_weights()
    kind = {C.HEADS: self.fit_heads, C.CACHED_TOP: self.fit_cached_top,
            C.END_TO_END: self.fit_end_to_end}[stage.kind]
    if kind != self.fit_end_to_end and self.cache is None:
      self.cache = self._build_cache()
    h = kind(stage, index) if kind == self.fit_end_to_end else kind(stage)
    record = {k: (v if k == 'image_size' else [float(x) for x in v]) for k, v in h.history.items()}
    record['seconds'] = time.time() - ts
    stage_best = max(h.history.get('val_class_top1', [0.0]))
    if stage_best < self.best:
      self.full.set_weights(before)
      if self.upper is not None:
        M.el.copy_weights(self.base, self.upper)
      record['rolled_back'] = True
      logging.info('stage %s: best validation top-1 %.4f < %.4f before it; weights restored',
                   stage.name, stage_best, self.best)
    self.best = max(self.best, stage_best)
    self.history[stage.name] = record
    self.done = index + 1
    self.ckpt.write(self.state(), self.full, kind='done')
    logging.info('stage %s done in %.1fs: %s', stage.name, time.time() - ts, record)

  def finish(self) -> None:
    """Validation figures, calibration and decision thresholds (validation split), export."""
    self.history['decoded_photos_in_memory'] = self.keep_photos
    if self.cache is not None:
      self.history['cache_seconds'] = self.cache['seconds']
      self.history['activations_on_disk'] = bool(self.cache['store'].spilled)
      self.cache['store'].cleanup()
      self.cache = None
    _compile(self.full, 1e-4, self.mc.label_smoothing)
    final = self.full.evaluate(self.validation, return_dict=True, verbose=0)
    logging.info('float model on the validation split: %s', final)
    probs, truth = validation_probabilities(self.full, self.validation,
                                            M.parse_views(self.mc.serving_views or ['full']))
    calibrated = None
    if self.mc.calibrate:
      calibrated, probs = calibrate(self.full, probs, truth)
      logging.info('calibration: %s', calibrated)
    serve = serve_thresholds(self.cfg.serve, probs[M.CLASS_OUT],
                             truth[M.CLASS_OUT], export.labels(self.tft_out, 'class'))
    logging.info('decision thresholds: %s', serve)
    export.export_all(self.full, self.tft_out, self.fn_args, self.cfg, history={
        'stages': self.history, 'validation': final, 'warm_start': self.started_from,
        'inputs': self.opened, 'calibration': calibrated, 'serve': serve,
        'train_seconds': self.seconds_before + time.time() - self.t0})

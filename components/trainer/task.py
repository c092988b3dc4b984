"""Trainer `run_fn`: staged EfficientNet-Lite fine-tuning that is practical on 2 CPU cores.

Stage `trainable: none` never runs the frozen backbone more than once per photo: its
pooled activations are computed once (plus a few augmented views) and only the heads
are trained on them. Later stages unfreeze the top blocks and train end to end on
augmented photos. Every choice (best epoch, stage roll-back, the warm-start bar) is made on
the validation split (TFX `eval_args`); the test split never reaches the Trainer.
"""
from __future__ import annotations

import io
import os
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
import tf_keras as keras
from absl import logging

from carvision.components import calibration
from carvision.components import features as F
from carvision.components import files as files_lib
from carvision.components import names
from carvision.components.progress import duration, say
from carvision.components.trainer import calibrate as K
from carvision.components.trainer import co_tuning as CT
from carvision.components.trainer import config as C
from carvision.components.trainer import data as D
from carvision.components.trainer import distribute
from carvision.components.trainer import early_learning as EL
from carvision.components.trainer import export
from carvision.components.trainer import label_noise as LN
from carvision.components.trainer import model as M
from carvision.components.trainer import resume
from carvision.components.trainer import small_loss as SL
from carvision.components.trainer import warm_start as W


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


def _optimizer(schedule, weight_decay: float = 0.0):
  """Adam, or AdamW with decoupled weight decay on kernels only (biases, BatchNorm exempt)."""
  if not weight_decay:
    return keras.optimizers.Adam(schedule)
  opt = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
  opt.exclude_from_weight_decay(var_names=['bias', 'gamma', 'beta'])
  return opt


def _compile(m: keras.Model, schedule, smoothing: float, co_tuning=None, weight_decay: float = 0.0):
  """co_tuning: (relationship, weight) for a model with the kept ImageNet head (co_tuning.py)."""
  loss = {M.CLASS_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
          M.MAKE_OUT: keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)}
  weights = {M.CLASS_OUT: 1.0, M.MAKE_OUT: 0.3}
  if co_tuning is not None:
    loss[CT.IMAGENET_OUT], weights[CT.IMAGENET_OUT] = CT.loss(co_tuning[0]), co_tuning[1]
  m.compile(
      optimizer=_optimizer(schedule, weight_decay),
      loss=loss,
      loss_weights=weights,
      metrics={M.CLASS_OUT: [keras.metrics.CategoricalAccuracy(name='top1'),
                             keras.metrics.TopKCategoricalAccuracy(5, name='top5')],
               M.MAKE_OUT: [keras.metrics.CategoricalAccuracy(name='top1')]})


def run_fn(fn_args):
  """TFX Trainer entry point (GenericExecutor): orchestration only. The same code on a CPU,
  GPUs or a TPU (model.distribute); the stages are the configured schedule, each run by the
  function of its kind and rolled back when validation says it did not help."""
  cfg = C.trainer_config_from_json(fn_args.custom_config['config'])
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
    self.t0 = time.time()
    self.fn_args, self.cfg, self.mc = fn_args, cfg, cfg.model
    keras.utils.set_random_seed(self.mc.seed)
    self.size = self.mc.image_size
    # batch_size is per replica; learning rates scale with the replicas (distribute.scaled)
    self.batch, self.lr_scale = distribute.scaled(self.mc.batch_size, 1.0, replicas)
    if self.mc.early_learning and replicas > 1:
      raise ValueError(f'model.early_learning: its per-photo targets live on one device; '
                       f'this strategy has {replicas} replicas (set model.distribute: none)')
    self.tft_out = tft.TFTransformOutput(fn_args.transform_output)
    self.n_classes = self.tft_out.vocabulary_size_by_name(F.vocab_name('class'))
    self.n_makes = self.tft_out.vocabulary_size_by_name(F.vocab_name('make'))
    self.n_out = {M.CLASS_OUT: self.n_classes, M.MAKE_OUT: self.n_makes}
    self.spec = self.tft_out.transformed_feature_spec()
    # eval_files are the validation split (Trainer eval_args): what chooses, never what judges.
    self.train_files = files_lib.expand(fn_args.train_files)
    self.eval_files = files_lib.expand(fn_args.eval_files)
    self.opened = D.check_inputs(self.train_files, self.eval_files)
    logging.info('classes=%d makes=%d train files=%s', self.n_classes, self.n_makes,
                 self.train_files)
    self.base = M.backbone(self.mc.backbone, self.mc.weights, self.mc.image_size,
                           self.mc.stochastic_depth)
    self.head = M.heads(int(self.base.output.shape[-1]), self.n_classes, self.n_makes,
                        self.mc.dropout)
    self.full = M.classifier(self.base, self.head, self.size)
    self.tb = keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, write_graph=False)
    self.history: Dict = {}
    self.cache = None
    self.upper = self.lower = None
    self.best = -1.0  # best validation top-1 so far; a stage that does not beat it is rolled back
    self.started_from = self.inherited_seen = None
    self.source = W.source(self.mc, getattr(fn_args, 'base_model', None))
    # A warm start continues a trained model: the short schedule when one is configured.
    self.stages = (self.mc.warm_start_stages if self.source and self.mc.warm_start_stages
                   else self.mc.stages)
    # Checkpoints under the pipeline root, keyed by what decides the result (resume.py).
    custom = getattr(fn_args, 'custom_config', None) or {}
    self.ckpt = resume.Checkpoints(custom.get('resume_dir'), resume.run_key(
        custom.get('config', ''), [*self.train_files, *self.eval_files, fn_args.transform_output,
                                   self.source or '']), self.mc.checkpoint_every_s)
    self.done, self.resumed, self.seconds_before, self.attempt = 0, None, 0.0, 1
    self.relationship = None  # Co-Tuning's p(ImageNet class | car class), once computed
    self.imagenet_head = None  # Co-Tuning: the converted ImageNet head (kernel, bias), read once
    self.excluded = None  # photo keys of train ads with doubted labels (drop_label_issues)
    self.relabel = None  # (photo keys, class ids, make ids) of relabelled ones (label_audit_relabel)
    self._photo_ads = None  # {photo key: ad id} of the train split, once read

  # --- data ---------------------------------------------------------------------------

  def data(self, files, training, repeat=False, at=None, light=False, cached=False, view=0,
           keyed=False, exclude=None, relabel=None):
    return D.dataset(files, self.spec, at or self.size, self.batch, self.n_classes, self.n_makes,
                   training=training, repeat=repeat, crop_prob=self.mc.bbox_crop_prob,
                   decoded_size=self.size if cached else None, light=light, seed=self.mc.seed,
                   view=view, keyed=keyed, exclude=exclude, relabel=relabel)

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
      self.inherited_seen = W.seen_ads(self.source)
      self.started_from = W.warm_start(self.full, self.source, {
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

  def _mid_stage(self, index: int, fold: Optional[int] = None) -> Optional[Dict]:
    """The stopped epoch checkpoint of stage `index` (of a label-audit fold's pass), if any."""
    mid = (self.resumed or {}).get('stage')
    if not mid or mid['index'] != index or mid.get('fold') != fold:
      return None
    return {**mid, 'path': self.resumed['path']}

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
    store = D.ActivationStore(self.mc.activation_cache_mb)
    xtr, ytr = D.cached_features(self.lower, chained, backbone=backbone,
                               count=self.n_train * views, store=store)
    xev, yev = D.cached_features(self.lower, self.validation, backbone=backbone, count=self.n_val,
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

  def _label_issues(self) -> None:
    """model.drop_label_issues: the train ads an out-of-fold audit doubts (label_noise.py),
    found once per run and kept in the history, so a resumed run leaves out the same photos."""
    if not self.mc.drop_label_issues or self.excluded is not None:
      return
    found = self.history.get('label_issues')
    if found is None and self._in_training_audit() is not None:
      return  # found inside the first end-to-end stage (_audit_in_training)
    if found is None and self.mc.label_audit_epoch:
      say('Trainer: label audit by the frozen network\'s probes: this schedule has no '
          'end-to-end stage for model.label_audit_epoch')
    ads_of = self._train_photo_ads()
    if found is None:
      found = (self._cross_fit_audit(ads_of) if self.mc.label_audit_folds
               else self._probe_audit(ads_of))
      self.history['label_issues'] = found
      say(self._told(found, 'trained without'))
    self._exclude(found, ads_of)

  def _probe_audit(self, ads_of: Dict[int, int]) -> Dict:
    """Out-of-fold linear probes of the frozen network's pooled activations (clean view)."""
    if self.cache is None:
      self.cache = self._build_cache()
    xtr, ytr, _, _ = self._pooled()
    clean = ytr['key'] % D.MAX_VIEWS == 0
    groups = np.array([ads_of[int(p)] for p in ytr['key'][clean] // D.MAX_VIEWS])
    classes = ytr[M.CLASS_OUT][clean]
    probs = LN.out_of_fold(xtr[clean], classes, groups, self.n_classes, seed=self.mc.seed)
    return self._audit_record(probs, classes, groups, 'out-of-fold linear probes')

  def _cross_fit_audit(self, ads_of: Dict[int, int]) -> Dict:
    """model.label_audit_folds: for each fold of the train ads, the stages up to the first
    end-to-end one train from the start weights without the fold's ads (no roll-back) and
    score the clean view of its photos at the served size; cleanlab flags ads
    from those out-of-fold scores (label_noise.flag_ads). One fold: those stages train on
    every train ad and score them in sample (early_learning keeps them from memorising the
    wrong listings). A fold's scores are kept under the resume directory once finished and
    its end-to-end epochs are checkpointed as the run's are: a stopped run repeats the
    fold's cached stages (minutes) and goes on from its last epoch checkpoint."""
    ts, folds = time.time(), self.mc.label_audit_folds
    upto = next((i for i, st in enumerate(self.stages) if st.kind == C.END_TO_END),
                len(self.stages) - 1)
    photos = np.array(sorted(ads_of), np.int64)
    fold = LN.deal(np.array([ads_of[int(p)] for p in photos]), folds, self.mc.seed)
    names = ', '.join(st.name for st in self.stages[:upto + 1])
    start = self.full.get_weights()
    probs, classes, keys, temps = [], [], [], []
    for k in range(folds):
      name = f'label_audit/fold-{k}-of-{folds}.npz'
      scored = self.ckpt.load_arrays(name)
      if scored is None:
        say(f'Trainer: label audit fold {k + 1}/{folds}: stages {names} without '
            f'{int((fold == k).sum())} of {len(photos)} train photos' if folds > 1 else
            f'Trainer: label audit pass: stages {names} on all {len(photos)} train photos')
        self.excluded = photos[fold == k] if folds > 1 else None
        for i, st in enumerate(self.stages[:upto + 1]):
          if st.kind == C.END_TO_END:
            self.fit_end_to_end(st, i, fold=k)
          else:
            if self.cache is None:
              self.cache = self._build_cache()
            (self.fit_heads if st.kind == C.HEADS else self.fit_cached_top)(st)
        scored = self._score_train(self.size, exclude=photos[fold != k] if folds > 1 else None)
        self.ckpt.save_arrays(name, scored)
        self.full.set_weights(start)
        if self.upper is not None:
          M.el.copy_weights(self.base, self.upper)
      probs.append(scored['probs'])
      classes.append(scored['classes'])
      keys.append(scored['keys'])
      temps.append(round(float(scored['temperature']), 4) if 'temperature' in scored else None)
    self.excluded = None
    groups = np.array([ads_of[int(p)] for p in np.concatenate(keys)])
    found = self._audit_record(np.concatenate(probs), np.concatenate(classes), groups,
                               f'{folds}-fold cross-fitting of stages {names}' if folds > 1
                               else f'a pass of stages {names} on every train ad', ts)
    found['temperature'] = temps
    return found

  def _audit_record(self, probs, classes, groups, by: str, ts: Optional[float] = None) -> Dict:
    """What an audit found, as kept in the history: the flagged ads and, with
    label_audit_relabel, the class each relabelled one trains with."""
    ads = LN.flag_ads(probs, classes, groups, self.mc.label_audit_share)
    found = {'ads': ads, 'train_ads': int(len(set(groups.tolist()))), 'by': by}
    if self.mc.label_audit_relabel:
      moved = LN.relabels(probs, classes, groups, ads, self.mc.label_audit_relabel)
      found['relabelled'] = [[a, c] for a, c in sorted(moved.items())]
    if ts is not None:
      found['seconds'] = round(time.time() - ts, 1)
    return found

  def _score_train(self, at: int, exclude=None) -> Dict[str, np.ndarray]:
    """The network's calibrated class probabilities on the clean view of the train photos
    (not those in `exclude`) at size `at`, with each photo's listed class and photo key. The
    temperature is fitted on validation (clean labels, never trained on), so that
    label_audit_relabel's threshold means the same whichever network audits."""
    f = tf.function(lambda x: self.full(x, training=False)[M.CLASS_OUT])

    def scored(ds, keyed):
      out = {'probs': [], 'classes': [], 'keys': []}
      for x, y in ds:
        out['probs'].append(f(x).numpy())
        out['classes'].append(np.argmax(y[M.CLASS_OUT].numpy(), -1))
        if keyed:
          out['keys'].append(y['key'].numpy() // D.MAX_VIEWS)
      return {k: np.concatenate(v) for k, v in out.items() if v}

    val = scored(self.validation if at == self.size else self.data(self.eval_files, False, at=at),
                 False)
    t = calibration.temperature_for(val['probs'], val['classes'])['temperature']
    out = scored(self.data(self.train_files, False, at=at, keyed=True, exclude=exclude), True)
    out['probs'] = calibration.at_temperature(out['probs'], t).astype(np.float32)
    out['temperature'] = np.float64(t)
    return out

  def _exclude(self, found: Dict, ads_of: Dict[int, int]) -> None:
    """The photos the rest of the run leaves out, and those it trains with another class."""
    found.setdefault('count', f'share {self.mc.label_audit_share} of the train ads'
                     if self.mc.label_audit_share else "cleanlab's estimate")
    moved = {int(a): int(c) for a, c in found.get('relabelled', [])}
    if moved:
      makes = LN.class_makes(self.train_files, self.n_classes)
      moved = {a: c for a, c in moved.items() if makes[c] >= 0}
    gone = set(found['ads']) - set(moved)
    self.excluded = np.array(sorted(p for p, a in ads_of.items() if a in gone), np.int64)
    found['photos_left_out'] = int(len(self.excluded))
    keys = np.array(sorted(p for p, a in ads_of.items() if a in moved), np.int64)
    self.relabel = None
    if len(keys):
      cls = np.array([moved[ads_of[int(p)]] for p in keys], np.int64)
      self.relabel = (keys, cls, makes[cls])
    found['photos_relabelled'] = int(len(keys))

  @staticmethod
  def _told(found: Dict, then: str) -> str:
    """The one line an audit prints: how many ads, by what, and what the run does with them."""
    moved = len(found.get('relabelled', []))
    return (f"Trainer: {len(found['ads'])} of {found['train_ads']} train ads have photos that "
            f"contradict their label ({found['by']}): " + (
                f'{moved} relabelled to the class their photos show, {then} the others'
                if moved else f'{then} them'))

  def _in_training_audit(self) -> Optional[int]:
    """The index of the stage whose training audits the train ads (label_audit_epoch),
    None when the audit is the frozen network's probe or off."""
    if not (self.mc.drop_label_issues and self.mc.label_audit_epoch):
      return None
    return next((i for i, st in enumerate(self.stages) if st.kind == C.END_TO_END), None)

  def _audit_in_training(self, stage, at: int) -> None:
    """label_audit_epoch: the network after that many epochs of this stage scores the clean
    view of every train photo; cleanlab flags the ads from their photos' mean probabilities
    (label_noise.flag_ads), and the stage goes on without them. Scored in-sample, but before
    the network had time to memorise the exceptions; kept in the history, so a run resumed
    after this point leaves out the same ads."""
    ts = time.time()
    ads_of = self._train_photo_ads()
    scored = self._score_train(at)
    groups = np.array([ads_of[int(p)] for p in scored['keys']])
    found = self._audit_record(
        scored['probs'], scored['classes'], groups,
        f'the network after {self.mc.label_audit_epoch} epochs of stage {stage.name}', ts)
    found['temperature'] = round(float(scored['temperature']), 4)
    self.history['label_issues'] = found
    self._exclude(found, ads_of)
    say(self._told(found, 'the stage goes on without'))

  def _labels(self, labels: Dict) -> Dict:
    """Cached activations' labels with the relabelled photos' new class and make."""
    if self.relabel is None:
      return labels
    keys, cls, make = self.relabel
    row = labels['key'] // D.MAX_VIEWS
    at = np.searchsorted(keys, row)
    hit = (at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == row)
    out = dict(labels)
    for name, new in ((M.CLASS_OUT, cls), (M.MAKE_OUT, make)):
      if name in out:
        out[name] = np.where(hit, new[np.minimum(at, len(keys) - 1)], out[name])
    return out

  def _keep(self, labels) -> Optional[np.ndarray]:
    """Row mask of cached activations without the excluded photos (None: all rows)."""
    if self.excluded is None or not len(self.excluded):
      return None
    return ~np.isin(labels['key'] // D.MAX_VIEWS, self.excluded)

  def _schedule(self, stage, steps: int, warmup: int):
    return M.WarmupCosine(stage.learning_rate * self.lr_scale, steps, warmup)

  # --- the stage kinds ----------------------------------------------------------------

  def fit_heads(self, stage):
    """Frozen network: the heads alone on pooled activations (linear probe)."""
    xtr, ytr, xev, yev = self._pooled()
    train = D.ArrayBatches(xtr, self._labels(ytr), self.batch, self.n_out, shuffle=True,
                           seed=self.mc.seed, keys=ytr.get('key'), keep=self._keep(ytr))
    steps = len(train) * stage.epochs
    _compile(self.head, self._schedule(stage, steps, steps // 10), self.mc.label_smoothing,
             weight_decay=stage.weight_decay)
    return self.head.fit(train, epochs=stage.epochs, validation_data=D.ArrayBatches(
        xev, yev, 256, self.n_out, shuffle=False), callbacks=[self._stop(stage), self.tb, Progress(stage.name, stage.epochs)],
        verbose=0)

  def fit_cached_top(self, stage):
    """Top blocks + heads on cached lower activations; copied back into the backbone."""
    xtr, ytr, xev, yev = self.cache['maps']
    M.set_trainable(self.upper, 'top_blocks', stage.top_blocks)
    self.cache.pop('pooled', None)  # the upper part changes: pooled features go stale
    inp = keras.Input(xtr.shape[1:], name='activations')
    top = keras.Model(inp, M.named(self.head(self.upper(inp))), name='top')
    train = D.ArrayBatches(xtr, self._labels(ytr), self.batch, self.n_out, shuffle=True,
                           seed=self.mc.seed, keys=ytr.get('key'), keep=self._keep(ytr))
    steps = len(train) * stage.epochs
    _compile(top, self._schedule(stage, steps, steps // 10), self.mc.label_smoothing,
             weight_decay=stage.weight_decay)
    h = top.fit(train, epochs=stage.epochs, validation_data=D.ArrayBatches(
        xev, yev, 256, self.n_out, shuffle=False), callbacks=[self._stop(stage), self.tb, Progress(stage.name, stage.epochs)],
        verbose=0)
    M.el.copy_weights(self.upper, self.base)
    return h

  def _co_tuning(self):
    """(relationship, weight) when model.co_tuning is on for this run, else None: from
    ImageNet weights only (a warm start's backbone no longer matches the ImageNet head).
    Computed once from the frozen network's pooled train activations, kept under the
    resume directory so that a resumed run trains towards the same target."""
    mc = self.mc
    if not mc.co_tuning or self.source:
      return None
    off = mc.co_tuning_off()
    if off:
      if 'co_tuning' not in self.history:
        say(f'Trainer: Co-Tuning off: {off}')
        self.history['co_tuning'] = {'off': off}
      return None
    if self.relationship is None:
      path = os.path.join(self.ckpt.dir, 'co_tuning_relationship.npy') if self.ckpt.dir else None
      if path and tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, 'rb') as f:
          self.relationship = np.load(io.BytesIO(f.read()))
      else:
        if self.cache is None:
          self.cache = self._build_cache()
        xtr, ytr, _, _ = self._pooled()
        self.relationship = CT.relationship(xtr, ytr[M.CLASS_OUT], *self._imagenet_head(),
                                            self.n_classes)
        if path:
          buf = io.BytesIO()
          np.save(buf, self.relationship)
          tf.io.gfile.makedirs(self.ckpt.dir)
          with tf.io.gfile.GFile(path + '.tmp', 'wb') as f:
            f.write(buf.getvalue())
          tf.io.gfile.rename(path + '.tmp', path, overwrite=True)
      self.history['co_tuning'] = {'weight': mc.co_tuning,
                                   'target_entropy': float(np.mean(-np.sum(
                                       self.relationship * np.log(self.relationship + 1e-12), -1)))}
    return self.relationship, mc.co_tuning

  def _imagenet_head(self):
    if self.imagenet_head is None:
      self.imagenet_head = M.el.imagenet_head(self.mc.backbone)
    return self.imagenet_head

  def fit_end_to_end(self, stage, index: int = 0, fold: Optional[int] = None):
    """Photos through the network, the chosen blocks trainable, at the stage's size
    (FixRes: a lower training size) with standard or light augmentation; checkpointed after
    epochs and, when a checkpoint of this stage exists, continued from it (`fold`: of the
    pass of that label-audit fold, whose checkpoints are told apart from the run's)."""
    M.set_trainable(self.base, stage.trainable, stage.top_blocks)
    at = stage.image_size or self.size
    if at != self.size and self.full.input_shape[1] is not None:
      raise ValueError(f'stage {stage.name}: image_size {at} needs a backbone of any input '
                       f'size (EfficientNet-Lite); {self.mc.backbone} is built at {self.size}')
    audit = (self.mc.label_audit_epoch if self._in_training_audit() == index
             and 'label_issues' not in self.history else None)
    # An epoch of the auditing stage stays its steps before the audit: one schedule.
    left_out = (len(self.excluded) if self.excluded is not None
                and self._in_training_audit() != index else 0)
    per_epoch = max(1, (self.n_train - left_out) // self.batch)
    co = self._co_tuning()
    # With Co-Tuning the stage trains `full` inside a model that also has the ImageNet head
    # (fresh from the converted weights each stage: a resumed run trains the same model).
    net = CT.training_model(self.full, CT.head_layer(*self._imagenet_head())) if co else self.full
    net = SL.wrap(net, self.mc.drop_high_loss, self._small_loss_warmup(index, per_epoch))
    net = EL.wrap(net, self.mc.early_learning, self.mc.early_learning_momentum,
                  self._early_learning_photos(), self.n_classes, D.MAX_VIEWS)
    _compile(net, self._schedule(stage, per_epoch * stage.epochs, per_epoch // 2),
             self.mc.label_smoothing, co, stage.weight_decay)
    mid = self._mid_stage(index, fold)
    stop = self._stop(stage, mid)
    saver = resume.EpochCheckpoint(self.ckpt, self.state, index, stage.epochs, stop,
                                   mid['history'] if mid else None, fold=fold)
    if mid and (mid['stopped'] or mid['epoch'] >= stage.epochs):
      if stop._restored_weights is not None:  # pylint: disable=protected-access
        net.set_weights(stop._restored_weights)  # what on_train_end would have done
      return _History(dict(saver.history, image_size=at))
    if mid:
      net.optimizer.build(net.trainable_variables)
      resume.Checkpoints.restore(mid['path'], net, net.optimizer)
    start = mid['epoch'] if mid else 0
    if audit is not None and start >= audit:  # resumed after the audit's epoch, before its record
      self._audit_in_training(stage, at)
      audit = None
    # Up to the audit's epoch on every train photo, then on the photos left (a second fit:
    # the optimizer, its schedule and the early-stopping state go on).
    net.stop_training = False  # an earlier stage's early stop is not this one's
    for end in ([audit] if audit is not None else []) + [stage.epochs]:
      if end > start and not net.stop_training:
        train = self.data(self.train_files, True, repeat=True, at=at, cached=self.keep_photos,
                          light=stage.augment == 'light', exclude=self.excluded,
                          relabel=self.relabel, keyed=bool(self.mc.early_learning))
        if co:
          train = CT.with_target(train)
        stop.paused = end < stage.epochs
        net.fit(train, steps_per_epoch=per_epoch, epochs=end, initial_epoch=start,
                validation_data=self.validation,
                callbacks=[stop, saver, self.tb, Progress(stage.name, stage.epochs, start)],
                verbose=0)
        if end == audit and not net.stop_training:
          self._audit_in_training(stage, at)
        start = end
    return _History(dict(saver.history, image_size=at))

  def _train_photo_ads(self) -> Dict[int, int]:
    """{photo key: ad id} of the train split, read from its files once a run."""
    if self._photo_ads is None:
      self._photo_ads = LN.photo_ads(self.train_files)
    return self._photo_ads

  def _early_learning_photos(self) -> np.ndarray:
    """The train photo keys model.early_learning keeps targets for (recorded once)."""
    if not self.mc.early_learning:
      return np.zeros([0], np.int64)
    photos = np.array(sorted(self._train_photo_ads()), np.int64)
    self.history.setdefault('early_learning', {
        'weight': self.mc.early_learning, 'momentum': self.mc.early_learning_momentum,
        'photos': int(len(photos))})
    return photos

  def _small_loss_warmup(self, index: int, per_epoch: int) -> int:
    """Steps over which drop_high_loss ramps up: the first end-to-end stage's first
    drop_high_loss_warmup epochs; later stages drop the whole share from their first step."""
    first = next((i for i, st in enumerate(self.stages) if st.kind == C.END_TO_END), None)
    if self.mc.drop_high_loss and 'small_loss' not in self.history:
      self.history['small_loss'] = {'share': self.mc.drop_high_loss,
                                    'warmup_epochs': self.mc.drop_high_loss_warmup}
    return self.mc.drop_high_loss_warmup * per_epoch if index == first else 0

  def stage(self, stage, index: int = 0) -> None:
    """Runs one stage with the function of its kind; rolls it back if its best validation
    top-1 is below the best before it. A stage a stopped run finished is not run again."""
    if index < self.done:
      say(f'Trainer: stage {stage.name} finished before the stop: kept')
      return
    say(f'Trainer: stage {index + 1}/{len(self.stages)} {stage.name} ({stage.epochs} epochs, '
        + ('heads' if stage.trainable == 'none' else f'{stage.trainable} {stage.top_blocks}'
           if stage.trainable == 'top_blocks' else stage.trainable)
        + (f' at {stage.image_size} px' if stage.image_size else '') + ')')
    ts = time.time()
    self._label_issues()
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
    probs, truth = K.validation_probabilities(self.full, self.validation,
                                            M.parse_views(self.mc.serving_views or ['full']))
    calibrated = None
    if self.mc.calibrate:
      calibrated, probs = K.calibrate(self.full, probs, truth)
      logging.info('calibration: %s', calibrated)
    serve = K.serve_thresholds(self.cfg.serve, probs[M.CLASS_OUT],
                             truth[M.CLASS_OUT], export.labels(self.tft_out, 'class'))
    logging.info('decision thresholds: %s', serve)
    export.export_all(self.full, self.tft_out, self.fn_args, self.cfg, history={
        'stages': self.history, 'validation': final, 'warm_start': self.started_from,
        'inputs': self.opened, 'calibration': calibrated, 'serve': serve,
        'train_seconds': self.seconds_before + time.time() - self.t0},
        inherited_seen=self.inherited_seen)
    # The weights a later run can continue from without the SavedModel (models/car_ads keeps it).
    W.save_weights(self.full, os.path.join(self.fn_args.serving_model_dir, names.TFLITE_DIR,
                                           names.WARM_START))

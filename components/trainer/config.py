"""The Trainer's configuration: its hyper-parameters (stages), model options and the
answers' thresholds, typed and checked, without TensorFlow. The pipeline's config composes
these; run_fn rebuilds them from the JSON the pipeline hands the Trainer."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated, Any, Dict, List, Optional

import pydantic
import pydantic.dataclasses

from carvision.components.backbone import efficientnet_lite, tf_checkpoint
from carvision.components.validation import (STRICT, Fraction, NonNegative, Positive, PositiveFloat,
                                   check, explain, one_of)
from carvision.components.views import parse_views

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKBONES = tuple(efficientnet_lite.VARIANTS) + tuple(tf_checkpoint.VARIANTS)
TRAINABLE = ('none', 'top_blocks', 'all')
AUGMENT = ('standard', 'light')
WARM_STARTS = ('none', 'latest_blessed')
# How a stage trains (StageConfig.kind): the heads on pooled activations of the frozen network,
# the top blocks on cached lower activations, or photos through the network end to end.
HEADS, CACHED_TOP, END_TO_END = 'heads', 'cached_top', 'end_to_end'


def check_warm_start(v: str) -> None:
  """`none`, `latest_blessed`, or a local path that must exist now, not after four components
  ran (gs:// is not checked)."""
  if v in WARM_STARTS or '://' in v:
    return
  if not os.path.exists(os.path.join(REPO_ROOT, v)):
    raise ValueError(f'no such file or directory (or one of {", ".join(WARM_STARTS)})')


@pydantic.dataclasses.dataclass(config=STRICT)
class StageConfig:
  name: str = 'head'
  trainable: Annotated[str, one_of(TRAINABLE)] = 'none'
  epochs: Positive = 1
  learning_rate: PositiveFloat = 1e-3
  top_blocks: Positive = 2
  # top_blocks only: train on activations of the frozen lower network computed once
  # (with the frozen stage's views) instead of running the whole network every step.
  cached: bool = False
  patience: Optional[NonNegative] = None  # early stopping for this stage; default model.early_stopping_patience
  # End-to-end stages only: train at this size (default model.image_size, the serving size).
  # Lower than the serving size = FixRes: cheaper steps, and random crops at train size see
  # cars about as large as whole photos at the (higher) test size. Validation is always at
  # model.image_size, the size that ships.
  image_size: Optional[Annotated[int, pydantic.Field(ge=32, le=1024)]] = None
  # standard: random resized crop (50-100 % area), flip, colour; light: the whole photo and
  # a flip, as served (a short last stage at the serving size: FixRes' fine-tune).
  augment: Annotated[str, one_of(AUGMENT)] = 'standard'
  # Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on the stage's trainable kernels,
  # as a share of the weight per unit of learning rate; biases and BatchNorm are exempt. 0: Adam.
  weight_decay: Annotated[float, pydantic.Field(ge=0.0)] = 0.0

  @property
  def kind(self) -> str:
    """heads, cached_top or end_to_end: how this stage trains (the one place it is decided)."""
    if self.trainable == 'none':
      return HEADS
    return CACHED_TOP if self.trainable == 'top_blocks' and self.cached else END_TO_END


@pydantic.dataclasses.dataclass(config=STRICT)
class ModelConfig:
  backbone: Annotated[str, one_of(BACKBONES)] = 'efficientnet_lite2'
  weights: str = 'imagenet'
  image_size: Annotated[int, pydantic.Field(ge=32, le=1024)] = 260
  batch_size: Positive = 32
  # Python, NumPy and TensorFlow seeds (initial heads, dropout, shuffles) and the stateless
  # augmentation's: the same clone trains the same model. Cached stages do not depend on the
  # order ExampleGen wrote the records in; streamed end-to-end epochs do (a shuffle buffer).
  seed: NonNegative = 7
  label_smoothing: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.1
  dropout: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.3
  # Stochastic depth of the EfficientNet-Lite backbone in end-to-end stages: the last
  # residual block's drop rate (earlier blocks less, linearly); 0 = off.
  stochastic_depth: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.0
  stages: List[StageConfig] = dataclasses.field(default_factory=list)
  early_stopping_patience: NonNegative = 3
  # End-to-end stages write a checkpoint after an epoch at most this often (model, optimizer,
  # early-stopping state; under the pipeline root): a stopped run goes on from there.
  checkpoint_every_s: Annotated[float, pydantic.Field(ge=0.0)] = 60.0
  bbox_crop_prob: Fraction = 0.0  # share of training views cropped to the car's bbox first
  feature_views: Annotated[int, pydantic.Field(ge=1, le=64)] = 2  # trainer MAX_VIEWS
  # End-to-end stages decode each training photo once (at model.image_size, uint8) and keep
  # it in memory while the set fits this budget; a bigger set is decoded again every epoch
  # (streamed from the TFRecords), so memory stays bounded at any data set size.
  photo_cache_mb: NonNegative = 3072
  # tf.distribute strategy: auto (several GPUs: mirrored; one GPU; else CPU), none, mirrored,
  # tpu. batch_size is per replica; learning rates scale with the number of replicas; mixed
  # precision only on GPUs with tensor cores and TPUs.
  distribute: Annotated[str, one_of(('auto', 'none', 'mirrored', 'tpu'))] = 'auto'
  # Activations of the frozen network (cached stages) stay in memory up to this size; the
  # rest is written to local disk (numpy memmap) and read back batch by batch.
  activation_cache_mb: NonNegative = 4096
  tflite_representative_samples: Positive = 200
  # Layers kept float in the int8 TFLite: the N with the largest int8-vs-float error on
  # validation photos (QuantizationDebugger). The head (FC, softmax) is always float.
  tflite_float_layers: NonNegative = 0
  # Also ship model_fast.tflite: int8, the full photo only (one backbone pass), gated on the
  # same floors and pushed only when it passes them. Off when serving_views is just `full`.
  fast_file: bool = True
  # Temperature scaling of both heads fitted on the validation split and baked into the
  # weights: every exported file returns calibrated probabilities (model card: T, ECE).
  calibrate: bool = True
  # Test-time views averaged inside every exported model (SavedModel, TFLite): `full`,
  # `flip`, `crop:<fraction>`. Each view is one more backbone pass at serving time.
  serving_views: Annotated[List[str], check(parse_views)] = dataclasses.field(
      default_factory=lambda: ['full'])
  # Where training starts: `none` (ImageNet weights), `latest_blessed` (the latest model this
  # pipeline's int8 gate blessed, TFX base_model; ImageNet on the first run) or a path to a
  # Trainer output / pushed version. Same backbone; labels are mapped (new classes start silent: a zero row, the lowest bias).
  warm_start: Annotated[Optional[str], check(lambda v: check_warm_start(v))] = 'none'
  # Co-Tuning: the weight of a second loss on the ImageNet head the converted weights carry,
  # trained towards p(ImageNet class | car class) in end-to-end stages (0: off). Only where
  # that head exists (weights imagenet, Lite0/1/2) and not on a warm start; otherwise the
  # Trainer says it is off and why (training.json).
  co_tuning: Annotated[float, pydantic.Field(ge=0.0)] = 0.0
  # Train without the photos of train ads whose labels an out-of-fold audit doubts
  # (label_noise.py: cleanlab on linear probes of the frozen network; listed in training.json).
  drop_label_issues: bool = False
  # Which model audits the train ads for drop_label_issues: 0, linear probes of the frozen
  # network (out of fold) before any stage; N > 0, the network itself after N epochs of the
  # first end-to-end stage, which then goes on without the flagged ads (early learning: a
  # network fits the consistent majority of the labels before it memorises the exceptions).
  label_audit_epoch: NonNegative = 0
  # K >= 2: the audit is K-fold cross-fitting instead: for each fold of the train ads, the
  # schedule's stages up to its first end-to-end one train from the start weights without
  # that fold's ads and score its photos; the run then trains without the flagged ads. About
  # (K - 1) extra runs of those stages, each on (K - 1) / K of the ads. K = 1: one extra run
  # of those stages on every train ad scores them in sample, and the run starts again from
  # the start weights on the audited labels (needs early_learning, which keeps that pass
  # from memorising the wrong listings). 0: off.
  label_audit_folds: NonNegative = 0
  # How many flagged ads drop_label_issues drops: 0, as many as cleanlab estimates are wrong;
  # a share (of the train ads) > 0, that share, the ads whose listed class the audit finds
  # least likely (set it to the wrong share an audit of unseen ads measured).
  label_audit_share: Annotated[float, pydantic.Field(ge=0.0, le=0.5)] = 0.0
  # > 0: a flagged ad whose photos' mean probability of one other class is at least this is
  # trained with that class (and its make) instead of being left out; 0: all are left out.
  # The network audits' probabilities are calibrated (a temperature fitted on validation);
  # the linear probes' are not.
  label_audit_relabel: Annotated[float, pydantic.Field(ge=0.0, le=1.0)] = 0.0
  # Small-loss selection (small_loss.py): end-to-end training steps leave out this share of
  # each batch, the photos of highest class loss (set it to the expected share of wrong
  # labels; 0: off), ramped up from 0 over the first drop_high_loss_warmup epochs of the
  # first end-to-end stage.
  drop_high_loss: Annotated[float, pydantic.Field(ge=0.0, le=0.5)] = 0.0
  drop_high_loss_warmup: NonNegative = 2
  # Early-learning regularisation (early_learning.py): the weight of a class-loss term that
  # keeps each train photo's prediction near the running average of its earlier ones
  # (early_learning_momentum), against memorising a wrong listed label; end-to-end stages
  # only, one replica (model.distribute on one device); 0: off.
  early_learning: Annotated[float, pydantic.Field(ge=0.0)] = 0.0
  early_learning_momentum: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.7
  # The schedule used instead of `stages` when training starts from a previous model.
  warm_start_stages: List[StageConfig] = dataclasses.field(default_factory=list)

  def co_tuning_off(self) -> Optional[str]:
    """Why Co-Tuning does not apply to this model (None: it does, or it is off)."""
    if self.co_tuning and self.weights != 'imagenet':
      return 'needs the ImageNet head: model.weights is not imagenet'
    if self.co_tuning and self.backbone not in efficientnet_lite.WEIGHT_PACKAGES:
      return f'no converted ImageNet head for {self.backbone}'
    return None

  @pydantic.model_validator(mode='after')
  def _end_to_end_only(self):
    """image_size / augment change how photos reach the whole network: refused (not ignored)
    on stages that train on cached activations, and other sizes need an any-size backbone."""
    for key in ('stages', 'warm_start_stages'):
      for i, st in enumerate(getattr(self, key)):
        cached = st.kind != END_TO_END
        where = f'model.{key}[{i}] ({st.name})'
        if cached and (st.image_size is not None or st.augment != 'standard'):
          raise ValueError(f'{where}: image_size/augment apply to end-to-end stages only '
                           '(trainable top_blocks without cached, or all)')
        if (st.image_size not in (None, self.image_size)
            and self.backbone not in efficientnet_lite.VARIANTS):
          raise ValueError(f'{where}: image_size {st.image_size} differs from model.image_size '
                           f'{self.image_size}; only EfficientNet-Lite backbones take any size')
    if self.stochastic_depth and self.backbone not in efficientnet_lite.VARIANTS:
      raise ValueError(f'model.stochastic_depth: only EfficientNet-Lite backbones have it, '
                       f'not {self.backbone}')
    if self.label_audit_folds and not self.drop_label_issues:
      raise ValueError(f'model.label_audit_folds {self.label_audit_folds}: applies to '
                       'model.drop_label_issues, which is off')
    if self.label_audit_folds == 1 and not self.early_learning:
      raise ValueError('model.label_audit_folds 1 (an in-sample audit pass) needs '
                       'model.early_learning: without it the pass memorises the wrong listings '
                       'it is meant to find')
    if self.label_audit_share and not self.drop_label_issues:
      raise ValueError(f'model.label_audit_share {self.label_audit_share}: applies to '
                       'model.drop_label_issues, which is off')
    if self.label_audit_relabel and not self.drop_label_issues:
      raise ValueError(f'model.label_audit_relabel {self.label_audit_relabel}: applies to '
                       'model.drop_label_issues, which is off')
    if self.label_audit_folds and self.label_audit_epoch:
      raise ValueError('model.label_audit_folds and model.label_audit_epoch are two ways to '
                       'audit the train ads: set one')
    if self.early_learning and self.drop_high_loss:
      raise ValueError('model.early_learning and model.drop_high_loss are two ways to train '
                       'past wrong labels: set one')
    if self.drop_label_issues and self.label_audit_epoch:
      # warm_start_stages train only on a warm start: a run from the start weights keeps them
      for key in ('stages',) + (('warm_start_stages',) if self.warm_start != 'none' else ()):
        # a schedule without an end-to-end stage is audited by the probe (the Trainer says so)
        first = next((st for st in getattr(self, key) if st.kind == END_TO_END), None)
        if first is not None and self.label_audit_epoch >= first.epochs:
          raise ValueError(
              f'model.label_audit_epoch {self.label_audit_epoch}: the first end-to-end stage of '
              f'model.{key} ({first.name}) has {first.epochs} epochs; the audit happens inside '
              'its training, so it needs more')
    return self


@pydantic.dataclasses.dataclass(config=STRICT)
class ServeConfig:
  """When `predict` answers the class, falls back to the make, or says "not sure".

  null: chosen by the Trainer on the validation split as the lowest threshold whose
  answers are right `target_precision` of the time (written beside the model, serve.json).
  A number fixes it.
  """
  class_min_confidence: Optional[Fraction] = None
  make_min_confidence: Optional[Fraction] = None
  target_precision: Fraction = 0.95


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """What the Trainer is given (model, serve, the license for the files' metadata): only
  these, so a gate or push change does not invalidate a cached Trainer. Travels as JSON in
  the Trainer's custom_config and is rebuilt typed (and validated again) by run_fn."""
  model: ModelConfig
  serve: ServeConfig
  license: str = ''

  def as_dict(self) -> Dict[str, Any]:
    return {'model': dataclasses.asdict(self.model), 'serve': dataclasses.asdict(self.serve),
            'license': self.license}

  def to_json(self) -> str:
    return json.dumps(self.as_dict(), sort_keys=True)


def trainer_config_from_json(text: str) -> TrainerConfig:
  data = json.loads(text)
  try:
    return TrainerConfig(model=ModelConfig(**data['model']), serve=ServeConfig(**data['serve']),
                         license=data.get('license') or '')
  except pydantic.ValidationError as e:
    raise explain(e) from None

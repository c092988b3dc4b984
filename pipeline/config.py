"""Typed configuration loaded from configs/*.yaml (with `extends:` inheritance).

One object flows through create_pipeline and the components, instead of a
15-argument function; overrides come from the CLI as dotted keys.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Annotated, Any, Dict, List, Optional

import pydantic
import pydantic.dataclasses
import yaml

from components.backbone import efficientnet_lite, tf_checkpoint
from components.views import parse_views

from components.errors import UserError
from components.features import SPLIT_ROLES

# `split_for` takes names in sorted order, so {test: 20, train: 70, validation: 10} puts in
# `test` exactly the ads that the old {train: 80, eval: 20} put in `eval`.
OLD_SPLITS_HINT = ("the two-split layout {train, eval} was replaced by {train, validation, test}: "
                   "{train: 80, eval: 20} becomes {train: 70, validation: 10, test: 20} "
                   "(test = the old eval ads)")

ConfigError = UserError  # a configuration or command-line value; the message names it
SECRET_KEYS = ('dsn',)   # their values are never echoed in an error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, 'configs')
if not os.path.isdir(CONFIG_DIR):  # installed from a wheel: setup.py's data_files
  import sys  # pylint: disable=g-import-not-at-top
  CONFIG_DIR = os.path.join(sys.prefix, 'carvision', 'configs')


# Every section is a pydantic dataclass: values are checked (types, ranges, choices) when a
# config is built or a field is assigned, and unknown keys are errors. One source of defaults.
_STRICT = pydantic.ConfigDict(extra='forbid', validate_assignment=True)
Fraction = Annotated[float, pydantic.Field(ge=0.0, le=1.0)]
Positive = Annotated[int, pydantic.Field(gt=0)]
NonNegative = Annotated[int, pydantic.Field(ge=0)]
Seconds = Annotated[float, pydantic.Field(gt=0.0)]
PositiveFloat = Annotated[float, pydantic.Field(gt=0.0)]
BACKBONES = tuple(efficientnet_lite.VARIANTS) + tuple(tf_checkpoint.VARIANTS)
TRAINABLE = ('none', 'top_blocks', 'all')
AUGMENT = ('standard', 'light')
WARM_STARTS = ('none', 'latest_blessed')


def _one_of(values):
  def check(v):
    if v not in values:
      raise ValueError(f'one of {", ".join(values)}')
    return v
  return pydantic.AfterValidator(check)


def _check(fn):
  """A plain check (raising ValueError) as a pydantic validator."""
  def run(v):
    if v is not None:
      fn(v)
    return v
  return pydantic.AfterValidator(run)


@pydantic.dataclasses.dataclass(config=_STRICT)
class HttpConfig:
  concurrency: Positive = 32
  connect_timeout_s: Seconds = 5.0
  read_timeout_s: Seconds = 20.0           # longest gap between two bytes
  deadline_s: Seconds = 60.0               # a whole fetch (retries included), or a `timeout` dead letter
  retries: NonNegative = 3
  backoff_factor: Annotated[float, pydantic.Field(ge=0.0)] = 0.2
  max_bytes: Positive = 64 << 20           # larger bodies are dead letters (too_large)
  # Job-wide request budget for the photo host, split evenly over `workers` (the most
  # fetching workers that run at once, e.g. Dataflow max_num_workers); None = no limit.
  max_requests_per_s: Optional[Seconds] = None
  workers: Positive = 1


@pydantic.dataclasses.dataclass(config=_STRICT)
class IngestConfig:
  dsn: Annotated[Optional[str], _check(lambda v: check_dsn(v))] = None
  csv: Optional[str] = None
  image_url_template: Annotated[str, _check(lambda v: check_template(v))] = (
      'http://127.0.0.1:8000/{p_hash}.jpg')
  vehicle_classes: List[str] = dataclasses.field(
      default_factory=lambda: ['car', 'truck', 'motorbike', 'bus'])
  min_confidence: Fraction = 0.0
  p_hash_pattern: Annotated[str, _check(lambda v: _regex(v))] = '^[0-9a-f]{16}$'
  partitions: Positive = 8
  http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
  max_pixels: Positive = 40_000_000
  # The p_hash is the perceptual hash (imagehash.phash, 64 bits) of the photo as served: a
  # fetched photo whose hash is further than this many bits from its name is another photo
  # (a `p_hash_mismatch` dead letter). Re-encoding moves a few bits, another photo ~32.
  # null: not checked.
  p_hash_max_distance: Annotated[Optional[NonNegative], _check(
      lambda v: _at_most(v, 64, 'ingest.p_hash_max_distance'))] = 10
  # Hash buckets by ad_id (weights, any positive integers): `train` fits the weights,
  # `validation` chooses (early stopping, roll-back, warm-start bar, float layers),
  # `test` judges (gates, reported figures). See components.features.SPLIT_ROLES.
  splits: Annotated[Dict[str, Any], _check(lambda v: check_splits(v))] = dataclasses.field(
      default_factory=lambda: {'train': 70, 'validation': 10, 'test': 20})
  max_dead_letter_share: Fraction = 0.10
  span: Optional[NonNegative] = None  # csv with {SPAN}: read this span (default: the latest)
  # Secret Manager version holding the database password, read by each worker when
  # PGPASSWORD is not set (Dataflow/Vertex); e.g. projects/p/secrets/pg/versions/latest.
  password_secret: Optional[str] = None


@pydantic.dataclasses.dataclass(config=_STRICT)
class StageConfig:
  name: str = 'head'
  trainable: Annotated[str, _one_of(TRAINABLE)] = 'none'
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
  augment: Annotated[str, _one_of(AUGMENT)] = 'standard'


@pydantic.dataclasses.dataclass(config=_STRICT)
class ModelConfig:
  backbone: Annotated[str, _one_of(BACKBONES)] = 'efficientnet_lite2'
  weights: str = 'imagenet'
  image_size: Annotated[int, pydantic.Field(ge=32, le=1024)] = 260
  batch_size: Positive = 32
  # Python, NumPy and TensorFlow seeds (initial heads, dropout, shuffles) and the stateless
  # augmentation's: the same clone trains the same model. Cached stages do not depend on the
  # order ExampleGen wrote the records in; streamed end-to-end epochs do (a shuffle buffer).
  seed: NonNegative = 7
  label_smoothing: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.1
  dropout: Annotated[float, pydantic.Field(ge=0.0, lt=1.0)] = 0.3
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
  distribute: Annotated[str, _one_of(('auto', 'none', 'mirrored', 'tpu'))] = 'auto'
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
  serving_views: Annotated[List[str], _check(parse_views)] = dataclasses.field(
      default_factory=lambda: ['full'])
  # Where training starts: `none` (ImageNet weights), `latest_blessed` (the latest model this
  # pipeline's int8 gate blessed, TFX base_model; ImageNet on the first run) or a path to a
  # Trainer output / pushed version. Same backbone; labels are mapped (new classes start silent: a zero row, the lowest bias).
  warm_start: Annotated[Optional[str], _check(lambda v: check_warm_start(v))] = 'none'
  # The schedule used instead of `stages` when training starts from a previous model.
  warm_start_stages: List[StageConfig] = dataclasses.field(default_factory=list)

  @pydantic.model_validator(mode='after')
  def _end_to_end_only(self):
    """image_size / augment change how photos reach the whole network: refused (not ignored)
    on stages that train on cached activations, and other sizes need an any-size backbone."""
    for key in ('stages', 'warm_start_stages'):
      for i, st in enumerate(getattr(self, key)):
        cached = st.trainable == 'none' or (st.trainable == 'top_blocks' and st.cached)
        where = f'model.{key}[{i}] ({st.name})'
        if cached and (st.image_size is not None or st.augment != 'standard'):
          raise ValueError(f'{where}: image_size/augment apply to end-to-end stages only '
                           '(trainable top_blocks without cached, or all)')
        if (st.image_size not in (None, self.image_size)
            and self.backbone not in efficientnet_lite.VARIANTS):
          raise ValueError(f'{where}: image_size {st.image_size} differs from model.image_size '
                           f'{self.image_size}; only EfficientNet-Lite backbones take any size')
    return self


@pydantic.dataclasses.dataclass(config=_STRICT)
class EvaluateConfig:
  top1_min: Fraction = 0.80
  top5_min: Fraction = 0.95
  max_regression: Fraction = 0.01
  # int8 TFLite top-1 may trail the float model by at most this (negative: int8 must beat it)
  max_int8_drop: Annotated[float, pydantic.Field(ge=-1.0, le=1.0)] = 0.01
  slice_by: List[str] = dataclasses.field(default_factory=list)
  tfma: bool = True             # also gate the float SavedModel with TFMA's Evaluator
  # Optional per-make gate (off: null): every make with at least `min_make_photos` test
  # photos must reach this top-1; the report lists the worst makes either way.
  min_make_top1: Optional[Fraction] = None
  min_make_photos: Positive = 20


@pydantic.dataclasses.dataclass(config=_STRICT)
class ServeConfig:
  """When `predict` answers the class, falls back to the make, or says "not sure".

  null: chosen by the Trainer on the validation split as the lowest threshold whose
  answers are right `target_precision` of the time (written beside the model, serve.json).
  A number fixes it.
  """
  class_min_confidence: Optional[Fraction] = None
  make_min_confidence: Optional[Fraction] = None
  target_precision: Fraction = 0.95


@pydantic.dataclasses.dataclass(config=_STRICT)
class PipelineSection:
  name: Annotated[str, pydantic.Field(pattern=r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')] = 'carvision'
  root: str = 'runs/carvision'
  metadata: str = 'runs/carvision/metadata.sqlite'
  enable_cache: bool = False
  beam_args: List[str] = dataclasses.field(default_factory=list)


@pydantic.dataclasses.dataclass(config=_STRICT)
class PushConfig:
  dir: str = 'runs/carvision/serving'
  license: str = ''             # written into the model card and the TFLite metadata


@pydantic.dataclasses.dataclass(config=_STRICT)
class CloudTrainerConfig:
  """Vertex AI custom training for the Trainer (`--runner vertex`): one worker pool."""
  machine_type: str = 'n1-standard-8'
  accelerator_type: Optional[str] = 'NVIDIA_TESLA_T4'   # null: CPU only
  accelerator_count: NonNegative = 1
  # More than 1 adds a worker pool of replica_count - 1 machines (the Trainer's strategy
  # uses the GPUs of one machine: several machines need MultiWorkerMirroredStrategy).
  replica_count: Positive = 1
  image: Optional[str] = None            # default: cloud.image


@pydantic.dataclasses.dataclass(config=_STRICT)
class CloudConfig:
  """Google Cloud: Dataflow for the Beam components, Vertex AI Pipelines for orchestration."""
  project: Optional[str] = None
  region: str = 'us-central1'
  image: Optional[str] = None            # the pipeline/worker container (Dockerfile)
  temp_location: Optional[str] = None    # gs://bucket/tmp
  staging_location: Optional[str] = None  # gs://bucket/staging
  machine_type: str = 'n1-standard-4'
  max_num_workers: Positive = 20
  disk_size_gb: Positive = 50
  experiments: List[str] = dataclasses.field(default_factory=lambda: ['use_runner_v2'])
  service_account: Optional[str] = None
  subnetwork: Optional[str] = None       # reaches Cloud SQL's private IP
  use_public_ips: bool = False
  vertex_spec: str = 'runs/vertex/carvision_pipeline.json'
  # With --runner vertex, the Trainer runs as a Vertex AI custom job on this machine
  # (null: in the pipeline's own container, on its CPU).
  trainer: Optional[CloudTrainerConfig] = None


@pydantic.dataclasses.dataclass(config=_STRICT)
class Config:
  pipeline: PipelineSection = dataclasses.field(default_factory=PipelineSection)
  ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
  push: PushConfig = dataclasses.field(default_factory=PushConfig)
  serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
  cloud: CloudConfig = dataclasses.field(default_factory=CloudConfig)
  source_file: str = ''

  def path(self, p: str) -> str:
    """Resolves a configured local path against the repository root."""
    if p is None or '://' in p or os.path.isabs(p):
      return p
    return os.path.join(REPO_ROOT, p)


def _where(loc) -> str:
  """pydantic's error location (('model', 'stages', 0, 'epochs')) as a dotted key."""
  out = ''
  for part in loc:
    if isinstance(part, int):
      out += f'[{part}]'
    elif not str(part).startswith('function-'):
      out += ('.' if out else '') + str(part)
  return out


def _explain(e: pydantic.ValidationError, prefix: str = '') -> ConfigError:
  """One line per problem: the key, the value given and what is allowed."""
  lines = []
  for err in e.errors():
    msg = err['msg'].removeprefix('Value error, ')
    key = '.'.join(p for p in (prefix, _where(err['loc'])) if p)
    value = '=<hidden>' if key.split('.')[-1] in SECRET_KEYS else f"={err.get('input')!r}"
    if err['type'] == 'unexpected_keyword_argument':
      lines.append(f'{key}: unknown key')
    elif err['type'] == 'dataclass_type':
      lines.append(f'{key}{value}: a section (a mapping of keys)')
    elif msg.startswith(key):  # our own checks name the key already
      lines.append(msg)
    else:
      lines.append(f'{key}{value}: {msg}')
  return ConfigError('; '.join(lines) or str(e))


def _regex(v: str) -> None:
  try:
    re.compile(v)
  except re.error as e:
    raise ValueError(f'not a regular expression: {e}') from None


def check_warm_start(v: str) -> None:
  """`none`, `latest_blessed`, or a local path that must exist now, not after four components
  ran (gs:// is not checked)."""
  if v in WARM_STARTS or '://' in v:
    return
  if not os.path.exists(os.path.join(REPO_ROOT, v)):
    raise ValueError(f'no such file or directory (or one of {", ".join(WARM_STARTS)})')


def check_dsn(dsn: Optional[str], setting: str = 'ingest.dsn') -> None:
  """A libpq DSN (key=value or URI) must parse and must not carry the password: a DSN is
  stored in ML Metadata, on the model card and in job specs; libpq reads PGPASSWORD."""
  if not dsn:
    return
  import psycopg2.extensions  # pylint: disable=g-import-not-at-top
  try:
    parts = psycopg2.extensions.parse_dsn(dsn)
  except psycopg2.ProgrammingError as e:
    raise ConfigError(f'{setting}: not a libpq connection string '
                      f'(host=... dbname=... or postgresql://host/db): {str(e).strip()}') from None
  if parts.get('password') is not None:
    raise ConfigError(f'{setting} contains a password: remove it and set PGPASSWORD '
                      '(or ingest.password_secret on Dataflow/Vertex); a DSN is stored in ML '
                      'Metadata and on the model card')


def _at_most(value, top, setting: str):
  if value is not None and value > top:
    raise ConfigError(f'{setting}={value!r}: at most {top}')


def check_template(template: str, setting: str = 'ingest.image_url_template') -> None:
  """Each photo's location is the template with {p_hash} filled in."""
  if not isinstance(template, str) or '{p_hash}' not in template:
    raise ConfigError(f'{setting}={template!r}: must contain {{p_hash}}, e.g. '
                      'https://host/images/{p_hash}.jpg')
  try:
    template.format(p_hash='0' * 16)
  except (KeyError, IndexError, ValueError) as e:
    raise ConfigError(f'{setting}={template!r}: only {{p_hash}} may be in braces ({e})') from None


def check_splits(splits: Any) -> Dict[str, int]:
  """`ingest.splits` must name exactly train, validation and test with positive weights."""
  if not isinstance(splits, dict):
    raise ConfigError(f'ingest.splits={splits!r}: a mapping {{train, validation, test}} -> weight')
  if 'eval' in splits:
    raise ConfigError(f'ingest.splits={splits!r}: {OLD_SPLITS_HINT}')
  if set(splits) != set(SPLIT_ROLES):
    raise ConfigError(f'ingest.splits={splits!r}: needs exactly the splits {sorted(SPLIT_ROLES)}')
  for name, w in splits.items():
    if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
      raise ConfigError(f'ingest.splits.{name}={w!r}: a positive integer weight')
  return splits


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out


def _yaml(text: str, where: str) -> Any:
  """YAML text parsed; a syntax error is a ConfigError naming where (file:line:column)."""
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, 'problem_mark', None)
    at = f'{where}:{mark.line + 1}:{mark.column + 1}' if mark is not None else where
    problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
    context = getattr(e, 'context', None)
    raise ConfigError(f'{at}: YAML syntax error: {problem}'
                      + (f' ({context})' if context else '')) from None


def _read(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path}: cannot read the config: {e}') from None
  data = _yaml(text, path) or {}
  if not isinstance(data, dict):
    raise ConfigError(f'{path}: a config is a mapping of sections, got {type(data).__name__}')
  parent = data.pop('extends', None)
  if parent:
    data = _merge(_read(os.path.join(os.path.dirname(path), parent)), data)
  return data


def resolve_path(name_or_path: str) -> str:
  """`demo` -> configs/demo.yaml; an existing path is taken as it is."""
  if os.path.exists(name_or_path):
    return name_or_path
  candidate = os.path.join(CONFIG_DIR, name_or_path)
  for c in (candidate, candidate + '.yaml'):
    if os.path.exists(c):
      return c
  raise ConfigError(f'--config: no config {name_or_path!r} (looked in {CONFIG_DIR})')


def _set_dotted(data: Dict[str, Any], key: str, value: Any) -> None:
  parts = key.split('.')
  for p in parts[:-1]:
    data = data.setdefault(p, {})
  data[parts[-1]] = value


def load(name_or_path: str = 'default', overrides: Optional[Dict[str, Any]] = None) -> Config:
  """Loads a config; `overrides` maps dotted keys (`evaluate.top1_min`) to values."""
  path = resolve_path(name_or_path)
  data = _read(path)
  for k, v in (overrides or {}).items():
    _set_dotted(data, k, v)
  cfg = build(data)
  cfg.source_file = os.path.abspath(path)
  return cfg


def build(data: Dict[str, Any]) -> Config:
  """A Config from plain data (YAML, JSON); every problem is named on one ConfigError line."""
  if not isinstance(data, dict):
    raise ConfigError(f'a config is a mapping of sections, got {type(data).__name__}')
  try:
    return Config(**data)
  except pydantic.ValidationError as e:
    raise _explain(e) from None


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


def trainer_config(cfg: Config) -> TrainerConfig:
  return TrainerConfig(model=cfg.model, serve=cfg.serve, license=cfg.push.license or '')


def trainer_config_from_json(text: str) -> TrainerConfig:
  data = json.loads(text)
  try:
    return TrainerConfig(model=ModelConfig(**data['model']), serve=ServeConfig(**data['serve']),
                         license=data.get('license') or '')
  except pydantic.ValidationError as e:
    raise _explain(e) from None


def parse_override(item: str):
  """`a.b=value` with a YAML-typed value."""
  key, _, raw = item.partition('=')
  if not key or not _:
    raise ConfigError(f'--set: override must be key=value, got {item!r}')
  return key, _yaml(raw, f'--set {key}')

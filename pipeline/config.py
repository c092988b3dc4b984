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

from carvision.components.errors import UserError
from carvision.components.features import SPLIT_ROLES
from carvision.components.trainer.config import (BACKBONES, WARM_STARTS, ModelConfig, ServeConfig,  # noqa: F401
                                       StageConfig, TrainerConfig, check_warm_start,
                                       trainer_config_from_json)
from carvision.components.validation import (STRICT as _STRICT, Fraction, NonNegative, Positive,  # noqa: F401
                                   PositiveFloat, Seconds, check as _check,
                                   explain as _explain, one_of as _one_of)

# `split_for` takes names in sorted order, so {test: 20, train: 70, validation: 10} puts in
# `test` exactly the ads that the old {train: 80, eval: 20} put in `eval`.
OLD_SPLITS_HINT = ("the two-split layout {train, eval} was replaced by {train, validation, test}: "
                   "{train: 80, eval: 20} becomes {train: 70, validation: 10, test: 20} "
                   "(test = the old eval ads)")

ConfigError = UserError  # a configuration or command-line value; the message names it

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded 10-class sample in the car_ads format: the demo's data and the tests' fixture.
SAMPLE_DIR = os.path.join(REPO_ROOT, 'data', 'car_ads_tiny')
CONFIG_DIR = os.path.join(REPO_ROOT, 'configs')
if not os.path.isdir(CONFIG_DIR):  # installed from a wheel: setup.py's data_files
  import sys  # pylint: disable=g-import-not-at-top
  CONFIG_DIR = os.path.join(sys.prefix, 'carvision', 'configs')


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
  max_requests_per_s: Optional[PositiveFloat] = None
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


def _regex(v: str) -> None:
  try:
    re.compile(v)
  except re.error as e:
    raise ValueError(f'not a regular expression: {e}') from None


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
  """`a.b=v`; a number indexes a list the config already has (`model.stages.1.epochs=10`)."""
  parts = key.split('.')
  for i, p in enumerate(parts):
    last = i == len(parts) - 1
    if isinstance(data, list):
      if not p.isdigit() or int(p) >= len(data):
        raise ConfigError(f'--set {key}: {".".join(parts[:i])} has {len(data)} items; '
                          f'{p!r} is not one of 0..{len(data) - 1}')
      p = int(p)
    elif not isinstance(data, dict):
      raise ConfigError(f'--set {key}: {".".join(parts[:i])} is a value, not a section')
    if last:
      data[p] = value
    else:
      data = data[p] if isinstance(data, list) else data.setdefault(p, {})


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


def trainer_config(cfg: Config) -> TrainerConfig:
  return TrainerConfig(model=cfg.model, serve=cfg.serve, license=cfg.push.license or '')


def parse_override(item: str):
  """`a.b=value` with a YAML-typed value."""
  key, _, raw = item.partition('=')
  if not key or not _:
    raise ConfigError(f'--set: override must be key=value, got {item!r}')
  return key, _yaml(raw, f'--set {key}')

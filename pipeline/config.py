"""Typed configuration loaded from configs/*.yaml (with `extends:` inheritance).

One object flows through create_pipeline and the components, instead of a
15-argument function; overrides come from the CLI as dotted keys.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, 'configs')
if not os.path.isdir(CONFIG_DIR):  # installed from a wheel: setup.py's data_files
  import sys  # pylint: disable=g-import-not-at-top
  CONFIG_DIR = os.path.join(sys.prefix, 'carvision', 'configs')


@dataclasses.dataclass
class HttpConfig:
  concurrency: int = 32
  connect_timeout_s: float = 5.0
  read_timeout_s: float = 20.0
  retries: int = 3
  backoff_factor: float = 0.2
  max_bytes: int = 64 << 20                 # larger bodies are dead letters (too_large)
  # Job-wide request budget for the photo host, split evenly over `workers` (the most
  # fetching workers that run at once, e.g. Dataflow max_num_workers); None = no limit.
  max_requests_per_s: Optional[float] = None
  workers: int = 1


@dataclasses.dataclass
class IngestConfig:
  dsn: Optional[str] = None
  csv: Optional[str] = None
  image_url_template: str = 'http://127.0.0.1:8000/{p_hash}.jpg'
  vehicle_classes: List[str] = dataclasses.field(
      default_factory=lambda: ['car', 'truck', 'motorbike', 'bus'])
  min_confidence: float = 0.0
  p_hash_pattern: str = '^[0-9a-f]{16}$'
  partitions: int = 8
  http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
  max_pixels: int = 40_000_000
  splits: Dict[str, int] = dataclasses.field(
      default_factory=lambda: {'train': 80, 'eval': 20})
  max_dead_letter_share: float = 0.10
  span: Optional[int] = None  # csv with {SPAN}: read this span (default: the latest)
  # Secret Manager version holding the database password, read by each worker when
  # PGPASSWORD is not set (Dataflow/Vertex); e.g. projects/p/secrets/pg/versions/latest.
  password_secret: Optional[str] = None


@dataclasses.dataclass
class StageConfig:
  name: str = 'head'
  trainable: str = 'none'  # none | top_blocks | all
  epochs: int = 1
  learning_rate: float = 1e-3
  top_blocks: int = 2
  # top_blocks only: train on activations of the frozen lower network computed once
  # (with the frozen stage's views) instead of running the whole network every step.
  cached: bool = False
  patience: Optional[int] = None  # early stopping for this stage; default model.early_stopping_patience


@dataclasses.dataclass
class ModelConfig:
  backbone: str = 'efficientnet_lite2'
  weights: str = 'imagenet'
  image_size: int = 260
  batch_size: int = 32
  label_smoothing: float = 0.1
  dropout: float = 0.3
  stages: List[StageConfig] = dataclasses.field(default_factory=list)
  early_stopping_patience: int = 3
  bbox_crop_prob: float = 0.0  # share of training views cropped to the car's bbox first
  feature_views: int = 2
  tflite_representative_samples: int = 200
  # Layers kept float in the int8 TFLite: the N with the largest int8-vs-float error on
  # calibration photos (QuantizationDebugger). The head (FC, softmax) is always float.
  tflite_float_layers: int = 0
  # Test-time views averaged inside every exported model (SavedModel, TFLite): `full`,
  # `flip`, `crop:<fraction>`. Each view is one more backbone pass at serving time.
  serving_views: List[str] = dataclasses.field(default_factory=lambda: ['full'])
  # A Trainer output (`.../Trainer/model/<id>`) or pushed version (`<push.dir>/<version>`) whose
  # weights start this training (same backbone, size and label vocabulary): resume across runs.
  warm_start: Optional[str] = None


@dataclasses.dataclass
class EvaluateConfig:
  top1_min: float = 0.80
  top5_min: float = 0.95
  max_regression: float = 0.01
  max_int8_drop: float = 0.01   # int8 TFLite top-1 may trail the float model by at most this
  slice_by: List[str] = dataclasses.field(default_factory=list)
  tfma: bool = True             # also gate the float SavedModel with TFMA's Evaluator


@dataclasses.dataclass
class PipelineSection:
  name: str = 'carvision'
  root: str = 'runs/carvision'
  metadata: str = 'runs/carvision/metadata.sqlite'
  enable_cache: bool = False
  beam_args: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PushConfig:
  dir: str = 'runs/carvision/serving'
  license: str = ''             # written into the model card and the TFLite metadata


@dataclasses.dataclass
class CloudConfig:
  """Google Cloud: Dataflow for the Beam components, Vertex AI Pipelines for orchestration."""
  project: Optional[str] = None
  region: str = 'us-central1'
  image: Optional[str] = None            # the pipeline/worker container (Dockerfile)
  temp_location: Optional[str] = None    # gs://bucket/tmp
  staging_location: Optional[str] = None  # gs://bucket/staging
  machine_type: str = 'n1-standard-4'
  max_num_workers: int = 20
  disk_size_gb: int = 50
  experiments: List[str] = dataclasses.field(default_factory=lambda: ['use_runner_v2'])
  service_account: Optional[str] = None
  subnetwork: Optional[str] = None       # reaches Cloud SQL's private IP
  use_public_ips: bool = False
  vertex_spec: str = 'runs/vertex/carvision_pipeline.json'


@dataclasses.dataclass
class Config:
  pipeline: PipelineSection = dataclasses.field(default_factory=PipelineSection)
  ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
  push: PushConfig = dataclasses.field(default_factory=PushConfig)
  cloud: CloudConfig = dataclasses.field(default_factory=CloudConfig)
  source_file: str = ''

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  def path(self, p: str) -> str:
    """Resolves a configured local path against the repository root."""
    if p is None or '://' in p or os.path.isabs(p):
      return p
    return os.path.join(REPO_ROOT, p)


def _build(cls, data: Dict[str, Any]):
  """Builds a dataclass from a dict, rejecting unknown keys (typos fail loudly)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(data) - set(fields)
  if unknown:
    raise ValueError(f'unknown {cls.__name__} keys: {sorted(unknown)}')
  kwargs = {}
  for name, value in data.items():
    ftype = fields[name].type
    sub = {'HttpConfig': HttpConfig, 'IngestConfig': IngestConfig,
           'ModelConfig': ModelConfig, 'EvaluateConfig': EvaluateConfig,
           'PipelineSection': PipelineSection, 'PushConfig': PushConfig,
           'CloudConfig': CloudConfig}.get(
               ftype if isinstance(ftype, str) else getattr(ftype, '__name__', ''))
    if sub is not None and isinstance(value, dict):
      value = _build(sub, value)
    elif name == 'stages':
      value = [_build(StageConfig, s) for s in value]
    kwargs[name] = value
  return cls(**kwargs)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
  out = copy.deepcopy(base)
  for k, v in over.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out


def _read(path: str) -> Dict[str, Any]:
  with open(path) as f:
    data = yaml.safe_load(f) or {}
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
  raise FileNotFoundError(f'no config {name_or_path!r} (looked in {CONFIG_DIR})')


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
  cfg = _build(Config, data)
  cfg.source_file = os.path.abspath(path)
  return cfg


def from_json(text: str) -> Config:
  data = json.loads(text)
  return _build(Config, data)


def parse_override(item: str):
  """`a.b=value` with a YAML-typed value."""
  key, _, raw = item.partition('=')
  if not key or not _:
    raise ValueError(f'override must be key=value, got {item!r}')
  return key, yaml.safe_load(raw)

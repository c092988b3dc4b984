"""The same pipeline on Google Cloud: Dataflow for the Beam components, Vertex AI Pipelines.

`dataflow`: the BeamDagRunner orchestrates from the launching machine; every Beam-based
component (ExampleGen, StatisticsGen, Transform, TFLiteEvaluator, Evaluator) runs as a
Dataflow job built from `configs/<name>.yaml: cloud`. `vertex`: the KubeflowV2DagRunner
compiles the pipeline into a pipeline-spec JSON (each component runs in `cloud.image`,
its Beam work on Dataflow with the same arguments) and, with --submit, submits it.
Nothing here may carry a secret: the database password reaches workers through Secret
Manager (`ingest.password_secret`), never through arguments or the spec.
"""
from __future__ import annotations

import os
import re
from typing import List

from carvision.pipeline.config import Config

_SECRET_PATTERNS = (re.compile(r'password\s*=', re.I), re.compile(r'PGPASSWORD', re.I))


class CloudConfigError(ValueError):
  """A cloud run is missing something it needs, or would leak a secret."""


def dataflow_args(cfg: Config) -> List[str]:
  """Beam pipeline options for Dataflow, validated offline (no network, no credentials)."""
  c = cfg.cloud
  missing = [k for k in ('project', 'region', 'temp_location', 'image') if not getattr(c, k)]
  if missing:
    raise CloudConfigError(f'cloud.{", cloud.".join(missing)} must be set for Dataflow/Vertex')
  for k in ('temp_location', 'staging_location'):
    v = getattr(c, k)
    if v and not v.startswith('gs://'):
      raise CloudConfigError(f'cloud.{k} must be a gs:// path, got {v!r}')
  if not cfg.pipeline.root.startswith('gs://'):
    raise CloudConfigError(f'pipeline.root must be on gs:// for Dataflow, got {cfg.pipeline.root!r}')
  args = ['--runner=DataflowRunner', f'--project={c.project}', f'--region={c.region}',
          f'--temp_location={c.temp_location}',
          f'--staging_location={c.staging_location or c.temp_location.rstrip("/") + "/staging"}',
          f'--sdk_container_image={c.image}', '--sdk_location=container',
          f'--machine_type={c.machine_type}', f'--max_num_workers={c.max_num_workers}',
          f'--disk_size_gb={c.disk_size_gb}']
  args += [f'--experiments={e}' for e in c.experiments]
  if c.service_account:
    args.append(f'--service_account_email={c.service_account}')
  if c.subnetwork:
    args.append(f'--subnetwork={c.subnetwork}')
  if not c.use_public_ips:
    args.append('--no_use_public_ips')
  check_no_secrets(cfg, args)
  from apache_beam.options.pipeline_options import (  # pylint: disable=g-import-not-at-top
      GoogleCloudOptions, PipelineOptions, StandardOptions, WorkerOptions)
  opts = PipelineOptions(args)
  gco = opts.view_as(GoogleCloudOptions)
  assert opts.view_as(StandardOptions).runner == 'DataflowRunner'
  assert gco.project == c.project and gco.region == c.region
  assert opts.view_as(WorkerOptions).max_num_workers == c.max_num_workers
  return args


def check_no_secrets(cfg: Config, args: List[str]) -> None:
  """Fails if the DSN or any argument carries a password (they end up in specs and logs)."""
  dsn = cfg.ingest.dsn or ''
  if _SECRET_PATTERNS[0].search(dsn):
    raise CloudConfigError('ingest.dsn contains a password; use ingest.password_secret '
                           '(Secret Manager) or PGPASSWORD')
  secret = os.environ.get('PGPASSWORD')
  for a in args:
    if any(p.search(a) for p in _SECRET_PATTERNS) or (secret and secret in a):
      raise CloudConfigError('a pipeline argument carries a database password')


def cloud_config(cfg: Config) -> Config:
  """The config as workers see it: the job-wide photo-host budget split over max workers."""
  cfg.ingest.http.workers = max(cfg.ingest.http.workers, cfg.cloud.max_num_workers)
  return cfg


def run_dataflow(cfg: Config) -> None:
  from tfx.orchestration.beam.beam_dag_runner import BeamDagRunner  # pylint: disable=g-import-not-at-top
  from carvision.pipeline.pipeline import create_pipeline  # pylint: disable=g-import-not-at-top
  from carvision.pipeline.run import card_extras, started  # pylint: disable=g-import-not-at-top
  cfg = cloud_config(cfg)
  cfg.pipeline.beam_args = dataflow_args(cfg)
  os.makedirs(os.path.dirname(cfg.path(cfg.pipeline.metadata)) or '.', exist_ok=True)
  BeamDagRunner().run(create_pipeline(cfg, started(card_extras())))


def compile_vertex(cfg: Config, output: str = None) -> str:
  """Writes the Vertex AI pipeline spec JSON; returns its path. Offline."""
  from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2  # pylint: disable=g-import-not-at-top
  from carvision.pipeline.pipeline import create_pipeline  # pylint: disable=g-import-not-at-top
  from carvision.pipeline.run import card_extras  # pylint: disable=g-import-not-at-top
  cfg = cloud_config(cfg)
  cfg.pipeline.beam_args = dataflow_args(cfg)
  output = cfg.path(output or cfg.cloud.vertex_spec)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  runner = v2.KubeflowV2DagRunner(
      config=v2.KubeflowV2DagRunnerConfig(default_image=cfg.cloud.image),
      output_dir=os.path.dirname(output), output_filename=os.path.basename(output))
  # Vertex keeps ML Metadata itself: no sqlite connection in the spec.
  pipe = create_pipeline(cfg, card_extras(), vertex_training=True)
  pipe.metadata_connection_config = None
  runner.run(pipe)
  return output


def submit_vertex(cfg: Config, spec_path: str) -> str:
  """Submits a compiled spec to Vertex AI Pipelines (needs credentials and network)."""
  from google.cloud import aiplatform  # pylint: disable=g-import-not-at-top
  aiplatform.init(project=cfg.cloud.project, location=cfg.cloud.region)
  job = aiplatform.PipelineJob(display_name=cfg.pipeline.name, template_path=spec_path,
                               pipeline_root=cfg.pipeline.root, enable_caching=cfg.pipeline.enable_cache)
  job.submit(service_account=cfg.cloud.service_account)
  return job.resource_name

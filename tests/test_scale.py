"""Offline checks of the cloud runners, and multi-process == in-process on the tiny set."""
import collections
import json
import os

import pytest

from carvision.pipeline import config as config_lib
from carvision.pipeline import runners
from tests.ingest_helpers import run_ingest


def test_vertex_spec_has_every_component_with_image_and_args(tmp_path, monkeypatch):
  from carvision.pipeline import cli
  monkeypatch.setenv('PGPASSWORD', 'not-in-the-spec-0451')
  out = tmp_path / 'spec.json'
  assert cli.main(['run', '--runner', 'vertex', '--config', 'dataflow', '--output', str(out)]) == 0
  text = out.read_text()
  spec = json.loads(text)['pipelineSpec']
  cfg = config_lib.load('dataflow')
  tasks = set(spec['root']['dag']['tasks'])
  assert {'CarAdsExampleGen', 'StatisticsGen', 'ImportSchemaGen', 'ExampleValidator', 'Transform',
          'Trainer', 'TFLiteEvaluator', 'Evaluator', 'VersionedPusher'} <= tasks
  containers = {k: v['container'] for k, v in spec['deploymentSpec']['executors'].items()
                if 'container' in v}
  assert len(containers) == 9
  for name, c in containers.items():
    assert c['image'] == cfg.cloud.image, name
    assert '--runner=DataflowRunner' in c['args'] and f'--project={cfg.cloud.project}' in c['args']
    assert f'--max_num_workers={cfg.cloud.max_num_workers}' in c['args']
  # the Trainer runs as a Vertex AI custom job on cloud.trainer's machine
  trainer = next(v for k, v in spec['deploymentSpec']['executors'].items() if 'Trainer' in k
                 and 'container' in v)
  args = ' '.join(trainer['container']['args'])
  assert 'google_cloud_ai_platform.trainer.executor' in args, args[:500]
  # its custom_config (a component parameter) carries the job spec
  trainer_params = json.dumps(spec['root']['dag']['tasks']['Trainer'])
  assert 'ai_platform_enable_vertex' in trainer_params and 'worker_pool_specs' in trainer_params
  t = cfg.cloud.trainer
  for value in (t.machine_type, t.accelerator_type, cfg.cloud.region, cfg.cloud.project):
    assert value in trainer_params, value
  # the ingest config travels in the spec with the secret's name, never a password
  assert cfg.ingest.password_secret in text
  assert 'not-in-the-spec-0451' not in text and 'PGPASSWORD' not in text
  assert 'password=' not in text.lower()


def test_dataflow_options_validate_offline(monkeypatch):
  cfg = config_lib.load('dataflow')
  args = runners.dataflow_args(cfg)
  for flag in ('--runner=DataflowRunner', '--project=', '--region=', '--temp_location=gs://',
               '--staging_location=gs://', '--sdk_container_image=', '--max_num_workers=',
               '--machine_type=', '--experiments=use_runner_v2', '--no_use_public_ips'):
    assert any(a.startswith(flag) for a in args), flag
  # missing essentials fail with the key to set
  with pytest.raises(runners.CloudConfigError, match='cloud.project'):
    runners.dataflow_args(config_lib.load('dataflow', {'cloud.project': None}))
  with pytest.raises(runners.CloudConfigError, match='gs://'):
    runners.dataflow_args(config_lib.load('dataflow', {'pipeline.root': 'runs/local'}))
  # a password in the DSN is refused when the config loads (every runner), and the
  # PGPASSWORD value in any argument when the Dataflow arguments are made
  with pytest.raises(config_lib.ConfigError, match='contains a password'):
    config_lib.load('dataflow', {'ingest.dsn': 'host=x password=hunter2'})
  monkeypatch.setenv('PGPASSWORD', 'carvision-pg-bucket')
  with pytest.raises(runners.CloudConfigError, match='password'):
    runners.dataflow_args(config_lib.load(
        'dataflow', {'cloud.temp_location': 'gs://carvision-pg-bucket/tmp'}))


def test_job_wide_rate_limit_is_split_over_workers():
  cfg = runners.cloud_config(config_lib.load('dataflow'))
  assert cfg.ingest.http.workers == cfg.cloud.max_num_workers
  assert cfg.ingest.http.max_requests_per_s / cfg.ingest.http.workers == 20.0


def _vocabulary(examples):
  """The expected vocabulary: frequency descending, ties by value ascending (how this test
  sorts; both runs are compared against the same list)."""
  counts = collections.Counter(ex.features.feature['label/class'].bytes_list.value[0]
                               for ex in examples)
  return [v.decode() for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]),
                                         reverse=False)]


def _content(ex):
  return sorted((k, str(v)) for k, v in ex.features.feature.items())


def test_two_worker_processes_match_in_process(tmp_path, tiny_dsn, image_host):
  import apache_beam as beam
  from carvision.components.example_gen import beam_ingest
  from tests.ingest_helpers import ingest_config
  single, _, ex1 = run_ingest(tmp_path / 'one', dsn=tiny_dsn,
                              image_url_template=image_host.url_template)
  cfg = ingest_config(dsn=tiny_dsn, image_url_template=image_host.url_template)
  out = str(tmp_path / 'two')
  opts = beam.options.pipeline_options.PipelineOptions(
      ['--direct_running_mode=multi_processing', '--direct_num_workers=2'])
  with beam.Pipeline(options=opts) as p:
    beam_ingest.build(p, cfg, os.path.join(out, 'examples'), out)
  multi = beam_ingest.read_summary(out)
  assert multi == single
  import glob
  import tensorflow as tf
  for split in ('train', 'validation', 'test'):
    files = glob.glob(os.path.join(out, 'examples', f'Split-{split}', '*.gz'))
    ex2 = [tf.train.Example.FromString(r.numpy())
           for r in tf.data.TFRecordDataset(files, compression_type='GZIP')]
    # the same examples (feature maps serialise in arbitrary order: compare contents)
    assert sorted(_content(e) for e in ex2) == sorted(_content(e) for e in ex1[split])
    assert _vocabulary(ex2) == _vocabulary(ex1[split])


def test_vertex_training_job_spec_from_config():
  from carvision.pipeline.pipeline import vertex_training_config
  cfg = config_lib.load('dataflow', {'cloud.trainer.replica_count': 3,
                                     'cloud.trainer.accelerator_type': 'NVIDIA_L4'})
  got = vertex_training_config(cfg)
  assert got['ai_platform_enable_vertex'] is True
  assert got['ai_platform_vertex_region'] == cfg.cloud.region
  args = got['ai_platform_training_args']
  assert args['project'] == cfg.cloud.project
  pools = args['job_spec']['worker_pool_specs']
  assert [p['replica_count'] for p in pools] == [1, 2]
  assert pools[0]['machine_spec'] == {'machine_type': 'n1-standard-8', 'accelerator_type': 'NVIDIA_L4',
                                      'accelerator_count': 1}
  assert pools[0]['container_spec']['image_uri'] == cfg.cloud.image
  assert args['job_spec']['service_account'] == cfg.cloud.service_account
  cpu = vertex_training_config(config_lib.load('dataflow', {'cloud.trainer.accelerator_type': None}))
  assert cpu['ai_platform_training_args']['job_spec']['worker_pool_specs'][0]['machine_spec'] == {
      'machine_type': 'n1-standard-8'}

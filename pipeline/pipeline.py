"""create_pipeline: the carvision TFX pipeline, top-down in data order."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

from tfx import v1 as tfx  # import tfx before tensorflow_model_analysis (EvalConfig appears then)
import tensorflow_model_analysis as tfma

from carvision.components import features as F
from carvision.components.example_gen.component import CarAdsExampleGen
from carvision.components.pusher.component import VersionedPusher
from carvision.components.tflite_evaluator.component import TFLiteEvaluator
from carvision.pipeline import config as config_lib
from carvision.pipeline.config import CONFIG_DIR, Config

SCHEMA_DIR = os.path.join(os.path.dirname(CONFIG_DIR), 'schemas')


RESUME_DIR = '_resume'  # under the pipeline root: what a stopped run needs to go on

# TFMA computes accuracies in float32: 38/40 is 0.94999999, which must pass a 0.95 gate.
FLOAT32_SLACK = 1e-6


def eval_config(cfg: Config) -> tfma.EvalConfig:
  """The deploy gate on the test split: top-1 / top-5 floors from config, and no regression
  of top-1 beyond `evaluate.max_regression` against the latest blessed model.

  TFMA applies a MetricConfig's thresholds to every slice, so `evaluate.slice_by` slices
  gate too; the default slices nothing (a make with 3 eval photos must not decide a deploy).
  """
  ev = cfg.evaluate

  def floor(lower: float) -> tfma.GenericValueThreshold:
    return tfma.GenericValueThreshold(lower_bound={'value': lower - FLOAT32_SLACK})

  metrics = [
      tfma.MetricConfig(
          class_name='SparseCategoricalAccuracy', config='{"name": "top1_accuracy"}',
          threshold=tfma.MetricThreshold(
              value_threshold=floor(ev.top1_min),
              change_threshold=tfma.GenericChangeThreshold(
                  direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                  absolute={'value': -float(ev.max_regression) - FLOAT32_SLACK}))),
      tfma.MetricConfig(
          class_name='SparseTopKCategoricalAccuracy', config='{"name": "top5_accuracy", "k": 5}',
          threshold=tfma.MetricThreshold(value_threshold=floor(ev.top5_min))),
      tfma.MetricConfig(class_name='ExampleCount'),
  ]
  return tfma.EvalConfig(
      model_specs=[tfma.ModelSpec(
          signature_name='serve_examples', label_key=F.label_id('class'),
          prediction_key='probabilities', preprocessing_function_names=['transform_features'])],
      slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[k])
                                            for k in ev.slice_by],
      metrics_specs=[tfma.MetricsSpec(metrics=metrics)])


def vertex_training_config(cfg: Config) -> Dict:
  """custom_config of TFX's Vertex AI Trainer: one custom job with `cloud.trainer`'s
  machine (names only: no secret, the job reads the same environment as the pipeline)."""
  t = cfg.cloud.trainer
  machine = {'machine_type': t.machine_type}
  if t.accelerator_type and t.accelerator_count:
    machine.update(accelerator_type=t.accelerator_type, accelerator_count=t.accelerator_count)
  container = {'image_uri': t.image or cfg.cloud.image}
  pools = [{'machine_spec': machine, 'replica_count': 1, 'container_spec': container}]
  if t.replica_count > 1:
    pools.append({'machine_spec': machine, 'replica_count': t.replica_count - 1,
                  'container_spec': container})
  job_spec = {'worker_pool_specs': pools}
  if cfg.cloud.service_account:
    job_spec['service_account'] = cfg.cloud.service_account
  return {'ai_platform_enable_vertex': True, 'ai_platform_vertex_region': cfg.cloud.region,
          'ai_platform_training_args': {'project': cfg.cloud.project, 'job_spec': job_spec}}


def create_pipeline(cfg: Config, card: Optional[Dict] = None,
                    vertex_training: bool = False) -> tfx.dsl.Pipeline:
  """The pipeline in data order. `card`: extra model-card fields (command, data, code version).
  `vertex_training`: the Trainer runs as a Vertex AI custom job (`cloud.trainer`)."""
  ingest = dataclasses.asdict(cfg.ingest)
  if ingest['csv']:
    ingest['csv'] = cfg.path(ingest['csv'])
  example_gen = CarAdsExampleGen(ingest_config=json.dumps(ingest, sort_keys=True))

  statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs['examples'])
  schema_gen = tfx.components.ImportSchemaGen(schema_file=os.path.join(SCHEMA_DIR, 'schema.pbtxt'))
  example_validator = tfx.components.ExampleValidator(
      statistics=statistics_gen.outputs['statistics'], schema=schema_gen.outputs['schema'])

  transform = tfx.components.Transform(
      examples=example_gen.outputs['examples'], schema=schema_gen.outputs['schema'],
      preprocessing_fn='carvision.components.transform.preprocessing_fn',
      # The test split is never transformed: nothing downstream of Transform (the Trainer)
      # can open it. The gates read it from ExampleGen's raw examples.
      splits_config=tfx.proto.SplitsConfig(analyze=['train'], transform=['train', 'validation']))

  # The latest model the int8 gate blessed (not merely the float gate): the gates' baseline,
  # and where training starts with model.warm_start: latest_blessed.
  model_resolver = tfx.dsl.Resolver(
      strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
      model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
      model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing,
                                     producer_component_id='TFLiteEvaluator',
                                     output_key='blessing'),
  ).with_id('latest_blessed_model_resolver')

  # The model and serve sections only (serve: the decision thresholds the Trainer writes
  # beside the model): a gate or push change must not invalidate a cached Trainer.
  # resume_dir: the Trainer's checkpoints (components/trainer/resume.py), so a stopped run
  # continues from its last finished epoch
  trainer_config = {'config': config_lib.trainer_config(cfg).to_json(),
                    'resume_dir': os.path.join(cfg.path(cfg.pipeline.root), RESUME_DIR)}
  trainer_class = tfx.components.Trainer
  if vertex_training and cfg.cloud.trainer is not None:
    trainer_class = tfx.extensions.google_cloud_ai_platform.Trainer
    trainer_config.update(vertex_training_config(cfg))
  trainer = trainer_class(
      run_fn='carvision.components.trainer.task.run_fn',
      examples=transform.outputs['transformed_examples'],
      transform_graph=transform.outputs['transform_graph'],
      schema=schema_gen.outputs['schema'],
      base_model=(model_resolver.outputs['model']
                  if cfg.model.warm_start == 'latest_blessed' else None),
      train_args=tfx.proto.TrainArgs(splits=['train']),
      eval_args=tfx.proto.EvalArgs(splits=['validation']),  # everything the Trainer chooses
      custom_config=trainer_config)

  ev = cfg.evaluate
  # The deploy gate on what ships: the int8 TFLite on the test split (+ parity with float).
  tflite_evaluator = TFLiteEvaluator(
      examples=example_gen.outputs['examples'], model=trainer.outputs['model'],
      baseline_model=model_resolver.outputs['model'], split='test',
      gate_config=json.dumps({'top1_min': ev.top1_min, 'top5_min': ev.top5_min,
                              'max_regression': ev.max_regression,
                              'max_int8_drop': ev.max_int8_drop,
                              'min_make_top1': ev.min_make_top1,
                              'min_make_photos': ev.min_make_photos}, sort_keys=True))

  evaluator = None
  if ev.tfma:
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs['examples'],
        model=trainer.outputs['model'],
        baseline_model=model_resolver.outputs['model'],
        eval_config=eval_config(cfg),
        example_splits=['test'])

  pusher = VersionedPusher(
      model=trainer.outputs['model'],
      tflite_blessing=tflite_evaluator.outputs['blessing'],
      tflite_evaluation=tflite_evaluator.outputs['evaluation'],
      model_blessing=evaluator.outputs['blessing'] if evaluator else None,
      examples=example_gen.outputs['examples'],
      dead_letters=example_gen.outputs['dead_letters'],
      push_dir=cfg.path(cfg.push.dir),
      model_card=json.dumps({**(card or {}), 'name': cfg.pipeline.name,
                             'config': dataclasses.asdict(cfg), 'license': cfg.push.license},
                            sort_keys=True))

  root = cfg.path(cfg.pipeline.root)
  return tfx.dsl.Pipeline(
      pipeline_name=cfg.pipeline.name,
      pipeline_root=root,
      components=[example_gen, statistics_gen, schema_gen, example_validator, transform,
                  model_resolver, trainer, tflite_evaluator]
                 + ([evaluator] if evaluator else []) + [pusher],
      enable_cache=cfg.pipeline.enable_cache,
      metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
          cfg.path(cfg.pipeline.metadata)),
      beam_pipeline_args=list(cfg.pipeline.beam_args))

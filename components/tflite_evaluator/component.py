"""TFLiteEvaluator: blesses a model only if its int8 TFLite (the file that ships) passes."""
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_beam_component
from tfx.dsl.components.base import executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from carvision.components.tflite_evaluator import executor


class TFLiteEvaluatorSpec(types.ComponentSpec):
  PARAMETERS = {
      # JSON: top1_min, top5_min, max_regression, max_int8_drop, min_make_top1 (None: no
      # per-make gate), min_make_photos.
      'gate_config': ExecutionParameter(type=str),
      'split': ExecutionParameter(type=str, optional=True),
  }
  INPUTS = {
      'examples': ChannelParameter(type=standard_artifacts.Examples),
      'model': ChannelParameter(type=standard_artifacts.Model),
      'baseline_model': ChannelParameter(type=standard_artifacts.Model, optional=True),
  }
  OUTPUTS = {
      'evaluation': ChannelParameter(type=standard_artifacts.ModelEvaluation),
      'blessing': ChannelParameter(type=standard_artifacts.ModelBlessing),
  }


class TFLiteEvaluator(base_beam_component.BaseBeamComponent):
  SPEC_CLASS = TFLiteEvaluatorSpec
  EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

  def __init__(self, examples: types.BaseChannel, model: types.BaseChannel, gate_config: str,
               baseline_model: Optional[types.BaseChannel] = None, split: str = 'test'):
    super().__init__(spec=TFLiteEvaluatorSpec(
        examples=examples, model=model, baseline_model=baseline_model,
        gate_config=gate_config, split=split,
        evaluation=types.Channel(type=standard_artifacts.ModelEvaluation),
        blessing=types.Channel(type=standard_artifacts.ModelBlessing)))

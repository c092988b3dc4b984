"""VersionedPusher: pushes a model blessed by the gates to <push_dir>/<version>/ with a model card."""
from typing import Optional

from tfx import types
from tfx.dsl.components.base import base_component
from tfx.dsl.components.base import executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from carvision.components.artifacts import DeadLetters
from carvision.components.pusher import executor


class VersionedPusherSpec(types.ComponentSpec):
  PARAMETERS = {
      'push_dir': ExecutionParameter(type=str),
      # JSON merged into model_card.json: name, config, code_version, command, data, license.
      'model_card': ExecutionParameter(type=str, optional=True),
  }
  INPUTS = {
      'model': ChannelParameter(type=standard_artifacts.Model),
      'tflite_blessing': ChannelParameter(type=standard_artifacts.ModelBlessing),
      'tflite_evaluation': ChannelParameter(type=standard_artifacts.ModelEvaluation),
      'model_blessing': ChannelParameter(type=standard_artifacts.ModelBlessing, optional=True),
      'examples': ChannelParameter(type=standard_artifacts.Examples, optional=True),
      'dead_letters': ChannelParameter(type=DeadLetters, optional=True),
  }
  OUTPUTS = {'pushed_model': ChannelParameter(type=standard_artifacts.PushedModel)}


class VersionedPusher(base_component.BaseComponent):
  SPEC_CLASS = VersionedPusherSpec
  EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(executor.Executor)

  def __init__(self, model, tflite_blessing, tflite_evaluation, push_dir: str,
               model_blessing=None, examples=None, dead_letters=None,
               model_card: Optional[str] = None):
    super().__init__(spec=VersionedPusherSpec(
        model=model, tflite_blessing=tflite_blessing, tflite_evaluation=tflite_evaluation,
        model_blessing=model_blessing, examples=examples, dead_letters=dead_letters,
        push_dir=push_dir, model_card=model_card,
        pushed_model=types.Channel(type=standard_artifacts.PushedModel)))

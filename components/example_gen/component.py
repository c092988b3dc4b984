"""CarAdsExampleGen: a TFX component reading Postgres or cars.csv and fetching photos in Beam.

Outputs `examples` (Examples, splits from config) and `dead_letters` (every row that
did not become an example, with its reason, plus a summary). The DSN in the config
must not carry a password: it is stored in ML Metadata; libpq reads PGPASSWORD.
"""
from tfx import types
from tfx.dsl.components.base import base_beam_component
from tfx.dsl.components.base import executor_spec
from tfx.types import standard_artifacts
from tfx.types.component_spec import ChannelParameter, ExecutionParameter

from carvision.components.artifacts import DeadLetters
from carvision.components.example_gen import executor


class CarAdsExampleGenSpec(types.ComponentSpec):
  PARAMETERS = {
      # JSON of pipeline.config.IngestConfig.
      'ingest_config': ExecutionParameter(type=str),
  }
  INPUTS = {}
  OUTPUTS = {
      'examples': ChannelParameter(type=standard_artifacts.Examples),
      'dead_letters': ChannelParameter(type=DeadLetters),
  }


class CarAdsExampleGen(base_beam_component.BaseBeamComponent):
  SPEC_CLASS = CarAdsExampleGenSpec
  EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(executor.Executor)

  def __init__(self, ingest_config: str):
    super().__init__(spec=CarAdsExampleGenSpec(
        ingest_config=ingest_config,
        examples=types.Channel(type=standard_artifacts.Examples),
        dead_letters=types.Channel(type=DeadLetters)))

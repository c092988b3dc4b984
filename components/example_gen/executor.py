"""Executor of CarAdsExampleGen: runs the ingestion Beam graph and accounts for every row."""
import json
from typing import Any, Dict, List

from absl import logging
from tfx import types
from tfx.dsl.components.base import base_beam_executor
from tfx.types import artifact_utils

from carvision.components.example_gen import beam_ingest


class Executor(base_beam_executor.BaseBeamExecutor):

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    ingest = json.loads(exec_properties['ingest_config'])
    examples = artifact_utils.get_single_instance(output_dict['examples'])
    dead = artifact_utils.get_single_instance(output_dict['dead_letters'])
    if ingest.get('csv') and '{' in ingest['csv']:
      # Span/version specs: read the latest (or configured) span, record it like TFX does.
      resolved = beam_ingest.resolve_csv(ingest['csv'], ingest.get('span'))
      ingest = dict(ingest, csv=resolved['pattern'])
      examples.span = resolved['span']
      if resolved['version'] is not None:
        examples.version = resolved['version']
      examples.set_string_custom_property('input_fingerprint', resolved['fingerprint'])
      logging.info('cars.csv span %s version %s: %s', resolved['span'], resolved['version'],
                   resolved['pattern'])
    with self._make_beam_pipeline() as p:
      beam_ingest.build(p, ingest, examples.uri, dead.uri)
    summary = beam_ingest.read_summary(dead.uri)
    examples.split_names = artifact_utils.encode_split_names(list(ingest['splits']))
    examples.set_string_custom_property('file_format', 'tfrecords_gzip')
    examples.set_string_custom_property('payload_format', 'FORMAT_TF_EXAMPLE')
    for split, n in summary['examples'].items():
      examples.set_int_custom_property(f'examples_{split}', n)
    dead.set_int_custom_property('rows', summary['rows'])
    dead.set_int_custom_property('dead_letters', sum(summary['dead_letters'].values()))
    dead.set_string_custom_property('summary', json.dumps(summary, sort_keys=True))
    logging.info('CarAdsExampleGen summary: %s', json.dumps(summary))
    beam_ingest.check_share(summary, float(ingest['max_dead_letter_share']))

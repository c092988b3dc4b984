"""Executor of VersionedPusher: blessed models only, to <push_dir>/<version>/, atomically.

A version directory is assembled under `<push_dir>/.partial-<version>/` and renamed
into place, so readers never see a half-written version (on object stores, where
rename is a copy, `model_card.json` is written last and marks a complete version).
"""
import datetime
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import tensorflow as tf
from absl import logging
from tfx import types
from tfx.dsl.components.base import base_executor
from tfx.types import artifact_utils
from tfx.utils import io_utils

from carvision.components import serving
from carvision.components import names
from carvision.components.features import SPLIT_ROLES

CARD = names.MODEL_CARD


def _blessed(artifacts: List[types.Artifact]) -> bool:
  return bool(artifacts) and bool(artifacts[0].get_int_custom_property('blessed'))


def _since(started, now) -> Optional[float]:
  """Seconds from the launcher's start (ingestion included) to this push, when known."""
  if not started:
    return None
  return round((now - datetime.datetime.fromisoformat(started)).total_seconds(), 1)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def examples_fingerprint(examples_uri: str) -> str:
  """sha256 over the sorted (split file name, content sha256) of the ingested examples."""
  h = hashlib.sha256()
  for path in sorted(tf.io.gfile.glob(os.path.join(examples_uri, 'Split-*', '*'))):
    h.update(f'{os.path.relpath(path, examples_uri)}:{_sha256(path)}\n'.encode())
  return h.hexdigest()


def _stage_record(s):
  """A training stage's record for the card, or another history record with lists counted."""
  if isinstance(s, dict) and 'val_class_top1' in s:
    return {m: v for m, v in s.items()
            if m in ('seconds', 'rolled_back', 'image_size', 'val_class_top1')}
  if isinstance(s, dict):
    return {m: len(v) if isinstance(v, list) else v for m, v in s.items()}
  return s


def model_card(*, training: Dict, judged: Dict, extras: Dict, files: Dict, ingest: Dict,
               version: str, n_labels: int, examples_fingerprint: Optional[str],
               model_uri: str, now: datetime.datetime) -> Dict:
  """The model card of a pushed version, from what the Trainer recorded (`training.json`),
  what the int8 gate judged (`metrics.json`) and the run's extras. Pure: no I/O."""
  history = training.get('history') or {}
  inside = history.get('serving') or {}  # views, layers kept float (export.py)
  fast = judged['metrics'].get('fast') or {}
  return {
      'name': extras.get('name', 'carvision'),
      'version': version,
      'task': 'car make|model|submodel from one photo',
      'contract': {'input': 'the whole RGB photo, bilinear-resized to the input tensor H x W, '
                            'uint8 0-255, nothing else',
                   'output': 'output 0: class probabilities in labels.txt order; output 1: '
                             'make probabilities in make_labels.txt order (calibrated)',
                   # averaged inside the model over these views of the photo (model.serving_views)
                   'test_time_views': inside.get('views', ['full']),
                   'labels': n_labels},
      'files': files,
      'metrics': {judged['split']: {
          'int8_tflite': {k: judged['metrics'][k] for k in
                          ('examples', 'top1_accuracy', 'top5_accuracy', 'make_accuracy',
                           'per_ad', 'unknown_classes', 'ece', 'ece_floor', 'answers',
                           'worst_makes')
                          if k in judged['metrics']},
          'float_savedmodel': judged['metrics'].get('float'),
          'int8_tflite_fast': fast or None},
          'validation': {'float_keras': history.get('validation')},
          'train': {'float_keras_last_epoch': {
              k: v[-1] for stage in history.get('stages', {}).values()
              if isinstance(stage, dict) for k, v in stage.items()
              if isinstance(v, list) and k.startswith('class_')}}},
      # Which split did what: ads hashed by ad_id, no ad in two splits.
      'splits': {'by': 'sha256(ad_id) buckets', 'roles': SPLIT_ROLES,
                 'judged_on': judged['split'],
                 'trainer_inputs': history.get('inputs')},
      # temperature per head fitted on validation (baked into the weights); ECE on test above
      'calibration': history.get('calibration'),
      # the class / make / not-sure thresholds (serve.json) and where they were chosen
      'decision': history.get('serve'),
      'quantisation': {'int8_float_layers': inside.get('int8_float_layers'),
                       'always_float': inside.get('int8_float_ops')},
      'checks': judged['checks'],
      'thresholds': judged['gate'],
      'data': {'ingestion': ingest,
               'examples_fingerprint': examples_fingerprint,
               **extras.get('data', {})},
      'training': {'seconds': history.get('train_seconds'),  # summed over resumed attempts
                   'resumed': history.get('stages', {}).get('resumed'),
                   'warm_start': history.get('warm_start'),
                   # per stage: seconds, train size, roll-back, validation top-1 by epoch;
                   # the other records (Co-Tuning, the label audit) as they are, ad lists counted
                   'stages': {k: _stage_record(s)
                              for k, s in history.get('stages', {}).items() if k != 'resumed'}},
      'config': extras.get('config', training.get('config')),
      'code_version': extras.get('code_version'),
      'command': extras.get('command'),
      'machine': extras.get('machine'),
      'timestamps': {'run_started': extras.get('run_started'),
                     'trained': training.get('exported_at'), 'pushed': now.isoformat()},
      'wall_seconds': _since(extras.get('run_started'), now),
      # launches after the first one that resumed this run (a stop, then the same command)
      'resumes': extras.get('resumes', 0),
      'model_artifact': model_uri,
      'license': extras.get('license'),
  }


class Executor(base_executor.BaseExecutor):

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    pushed = artifact_utils.get_single_instance(output_dict['pushed_model'])
    model = artifact_utils.get_single_instance(input_dict['model'])
    gates = {'tflite (int8) gate': _blessed(input_dict['tflite_blessing'])}
    if input_dict.get('model_blessing'):
      gates['TFMA (float) gate'] = _blessed(input_dict['model_blessing'])
    if not all(gates.values()):
      failed = [k for k, ok in gates.items() if not ok]
      logging.info('not pushed: %s did not bless model %s', ', '.join(failed), model.uri)
      pushed.set_int_custom_property('pushed', 0)
      pushed.set_string_custom_property('not_pushed_reason', ', '.join(failed))
      return
    src = os.path.join(model.uri, names.SERVING_DIR)
    tdir = os.path.join(src, names.TFLITE_DIR)
    evaluation = artifact_utils.get_single_instance(input_dict['tflite_evaluation'])
    with tf.io.gfile.GFile(os.path.join(evaluation.uri, names.METRICS_JSON)) as f:
      judged = json.load(f)
    with tf.io.gfile.GFile(os.path.join(tdir, names.TRAINING_JSON)) as f:
      training = json.load(f)
    extras = json.loads(exec_properties.get('model_card') or '{}')
    now = datetime.datetime.now(datetime.timezone.utc)
    push_dir = exec_properties['push_dir']
    # One version everywhere: the one the Trainer wrote into the TFLite metadata.
    version = training.get('exported_at') or now.strftime('%Y%m%dT%H%M%SZ')
    if tf.io.gfile.exists(os.path.join(push_dir, version)):
      version += f'-m{model.id}'
    final = os.path.join(push_dir, version)
    partial = os.path.join(push_dir, f'.partial-{version}')
    tf.io.gfile.makedirs(partial)
    files = {}
    fast = judged['metrics'].get('fast') or {}
    for name in (names.INT8, names.FP16, names.LABELS, names.MAKE_LABELS, names.SERVE, names.FAST,
                 names.SEEN_ADS, names.WARM_START):
      if name in (names.MAKE_LABELS, names.SERVE, names.SEEN_ADS,
                  names.WARM_START) and not tf.io.gfile.exists(
          os.path.join(tdir, name)):
        continue  # a model exported before these were written
      if name == names.FAST and not fast.get('passes_floors'):
        continue  # the single-view file ships only when it passes the floors itself
      tf.io.gfile.copy(os.path.join(tdir, name), os.path.join(partial, name), overwrite=True)
      files[name] = {'bytes': tf.io.gfile.stat(os.path.join(tdir, name)).length,
                     'sha256': _sha256(os.path.join(tdir, name))}
    for name in (names.REPORT_HTML, names.REPORT_PNG, names.RISK_COVERAGE_PNG):
      if tf.io.gfile.exists(os.path.join(evaluation.uri, name)):
        tf.io.gfile.copy(os.path.join(evaluation.uri, name), os.path.join(partial, name), True)
    io_utils.copy_dir(src, os.path.join(partial, names.PUSHED_SAVED_MODEL))
    examples = input_dict.get('examples')
    dead = input_dict.get('dead_letters')
    ingest = json.loads(dead[0].get_string_custom_property('summary') or '{}') if dead else {}
    card = model_card(
        training=training, judged=judged, extras=extras, files=files, ingest=ingest,
        version=version, n_labels=len(serving.read_labels(os.path.join(tdir, names.LABELS))),
        examples_fingerprint=examples_fingerprint(examples[0].uri) if examples else None,
        model_uri=model.uri, now=now)
    with tf.io.gfile.GFile(os.path.join(partial, CARD), 'w') as f:
      json.dump(card, f, indent=1, sort_keys=False)
    tf.io.gfile.rename(partial, final, overwrite=False)
    logging.info('pushed %s', final)
    pushed.set_int_custom_property('pushed', 1)
    pushed.set_string_custom_property('pushed_destination', final)
    pushed.set_string_custom_property('pushed_version', version)

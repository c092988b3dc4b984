"""The real TFX pipeline on the embedded sample: PostgreSQL, HTTP photo host, BeamDagRunner."""
import glob
import os

import numpy as np
import pytest

from pipeline import config as config_lib
from pipeline import run
from tests.ingest_helpers import expected_from_labels


def _config(tmp, image_host_template, dsn, **over):
  overrides = {
      'pipeline.root': str(tmp / 'root'), 'pipeline.metadata': str(tmp / 'root' / 'mlmd.sqlite'),
      'push.dir': str(tmp / over.pop('push', 'push')),
      'ingest.dsn': dsn, 'ingest.image_url_template': image_host_template}
  overrides.update(over)
  return config_lib.load('demo', overrides)


@pytest.fixture(scope='module')
def first_run(tmp_path_factory, tiny_dsn):
  from pipeline import services
  from tests.conftest import TINY
  tmp = tmp_path_factory.mktemp('e2e')
  host = services.ImageHost(os.path.join(TINY, 'images'))
  try:
    cfg = _config(tmp, host.url_template, tiny_dsn)
    run.run_direct(cfg)
    yield tmp, cfg, run.summarize(cfg), host
  finally:
    host.stop()


def _one(root, component, output):
  dirs = glob.glob(os.path.join(root, component, output, '*'))
  assert len(dirs) == 1, dirs
  return dirs[0]


def test_examples_match_labels(first_run, tiny_labels, tiny_manifest):
  _, _, summary, _ = first_run
  n_examples, reasons = expected_from_labels(tiny_labels, tiny_manifest)
  assert summary['rows'] == len(tiny_labels)
  assert sum(summary['examples'].values()) == n_examples
  assert summary['dead_letters'] == reasons
  assert summary['examples']['train'] > 0 and summary['examples']['eval'] > 0


def test_schema_statistics_and_anomalies(first_run):
  tmp, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  schema = _one(root, 'ImportSchemaGen', 'schema')
  assert os.path.exists(os.path.join(schema, 'schema.pbtxt'))
  from tensorflow_metadata.proto.v0 import anomalies_pb2
  anomalies_dir = _one(root, 'ExampleValidator', 'anomalies')
  for split in ('train', 'eval'):
    path = os.path.join(anomalies_dir, f'Split-{split}', 'SchemaDiff.pb')
    a = anomalies_pb2.Anomalies()
    with open(path, 'rb') as f:
      a.ParseFromString(f.read())
    assert not a.anomaly_info, f'{split}: {dict(a.anomaly_info)}'


def test_transform_graph_vocabularies(first_run, tiny_labels):
  import tensorflow_transform as tft
  tmp, cfg, _, _ = first_run
  out = tft.TFTransformOutput(_one(cfg.path(cfg.pipeline.root), 'Transform', 'transform_graph'))
  classes = [v.decode() for v in out.vocabulary_by_name('label_class')]
  truth = {'|'.join((r['make'], r['model'], r['submodel'])) for r in tiny_labels}
  assert set(classes) <= truth and len(classes) == 10
  assert all(c.count('|') == 2 for c in classes)


def test_model_signatures_and_tflite(first_run):
  import tensorflow as tf
  from ai_edge_litert.interpreter import Interpreter
  from tests.conftest import TINY
  tmp, cfg, _, _ = first_run
  model_dir = os.path.join(_one(cfg.path(cfg.pipeline.root), 'Trainer', 'model'), 'Format-Serving')
  loaded = tf.saved_model.load(model_dir)
  assert {'serving_default', 'serve_examples', 'transform_features', 'serve_pixels'} <= set(
      loaded.signatures)
  photo = sorted(glob.glob(os.path.join(TINY, 'images', '*.jpg')))[0]
  with open(photo, 'rb') as f:
    out = loaded.signatures['serving_default'](images=tf.constant([f.read()]))
  probs = out['probabilities'].numpy()[0]
  assert probs.shape == (10,) and abs(probs.sum() - 1.0) < 1e-3
  labels = open(os.path.join(model_dir, 'tflite', 'labels.txt')).read().split('\n')[:-1]
  assert out['top_k_labels'].numpy()[0][0].decode() == labels[int(np.argmax(probs))]
  interp = Interpreter(model_path=os.path.join(model_dir, 'tflite', 'model.tflite'))
  interp.allocate_tensors()
  inp = interp.get_input_details()[0]
  size = cfg.model.image_size
  assert inp['dtype'] == np.uint8 and list(inp['shape']) == [1, size, size, 3]
  assert len(labels) == interp.get_output_details()[0]['shape'][-1] == 10


def test_evaluation_and_blessing_agree_with_push(first_run):
  _, cfg, summary, _ = first_run
  assert summary['eval_examples'] == summary['examples']['eval']
  for m in summary['metrics'].values():
    assert 0.0 <= m['value'] <= 1.0
  gates_pass = all(m['pass'] for m in summary['metrics'].values())
  assert summary['blessed'] == gates_pass
  pushed = glob.glob(os.path.join(cfg.path(cfg.push.dir), '*', 'saved_model.pb'))
  assert bool(pushed) == summary['blessed'] == summary['pushed']


def test_reachable_threshold_pushes_and_impossible_threshold_blocks(first_run, tiny_dsn):
  """Re-runs with the cache on: only the resolver, Evaluator and Pusher run again."""
  tmp, _, _, host = first_run
  easy = _config(tmp, host.url_template, tiny_dsn, push='push_easy',
                 **{'pipeline.enable_cache': True, 'evaluate.top1_min': 0.0,
                    'evaluate.top5_min': 0.0, 'evaluate.max_regression': 1.0})
  run.run_direct(easy)
  s = run.summarize(easy)
  assert s['blessed'] and s['pushed']
  version = glob.glob(os.path.join(easy.path(easy.push.dir), '*'))
  assert len(version) == 1
  assert os.path.exists(os.path.join(version[0], 'saved_model.pb'))
  assert os.path.exists(os.path.join(version[0], 'tflite', 'model.tflite'))

  impossible = _config(tmp, host.url_template, tiny_dsn, push='push_impossible',
                       **{'pipeline.enable_cache': True, 'evaluate.top1_min': 1.01})
  run.run_direct(impossible)
  s = run.summarize(impossible)
  assert not s['blessed'] and not s['pushed']
  assert s['metrics']['top1_accuracy']['pass'] is False
  push_dir = impossible.path(impossible.push.dir)
  assert not os.path.exists(push_dir) or not os.listdir(push_dir)

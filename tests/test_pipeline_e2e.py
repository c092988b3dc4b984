"""The real TFX pipeline on the embedded sample: PostgreSQL, HTTP photo host, BeamDagRunner."""
import glob
import os

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

from carvision.pipeline import config as config_lib
from carvision.pipeline import run
from carvision.pipeline import summary as summary_lib
from tests.ingest_helpers import expected_from_labels


# The demo's recipe on EfficientNet-Lite0 at 128 px: these tests check the pipeline's
# mechanics (gates, pushes, warm starts, files), not the demo model's accuracy, at about a
# sixth of the demo network's compute (Lite2 at 260 px). Training is deterministic, so the
# relative checks below (a worse model, a warm start within 5 points) pass or fail every time.
SMALL = {'model.backbone': 'efficientnet_lite0', 'model.image_size': 128, 'model.warm_start': 'none'}


def _config(tmp, image_host_template, dsn, **over):
  overrides = {
      'pipeline.root': str(tmp / 'root'), 'pipeline.metadata': str(tmp / 'root' / 'mlmd.sqlite'),
      'push.dir': str(tmp / over.pop('push', 'push')),
      'ingest.dsn': dsn, 'ingest.image_url_template': image_host_template, **SMALL}
  overrides.update(over)
  return config_lib.load('demo', overrides)


@pytest.fixture(scope='module')
def first_run(tmp_path_factory, tiny_dsn):
  from carvision.pipeline import services
  from tests.helpers import TINY
  tmp = tmp_path_factory.mktemp('e2e')
  host = services.ImageHost(os.path.join(TINY, 'images'))
  try:
    # top-1 1.0 on the test split (every photo right; the demo model is far from it): the
    # first run must be refused by both gates and push nothing (the re-runs below bless it)
    cfg = _config(tmp, host.url_template, tiny_dsn, **{'evaluate.top1_min': 1.0})
    run.run_direct(cfg)
    yield tmp, cfg, summary_lib.summarize(cfg), host
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
  assert all(summary['examples'][s] > 0 for s in ('train', 'validation', 'test'))


def test_schema_statistics_and_anomalies(first_run):
  tmp, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  schema = _one(root, 'ImportSchemaGen', 'schema')
  assert os.path.exists(os.path.join(schema, 'schema.pbtxt'))
  from tensorflow_metadata.proto.v0 import anomalies_pb2
  anomalies_dir = _one(root, 'ExampleValidator', 'anomalies')
  for split in ('train', 'validation', 'test'):
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


def test_trainer_never_opens_the_test_split(first_run):
  """Transform writes train and validation only, and the Trainer read nothing else."""
  import json
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  transformed = _one(root, 'Transform', 'transformed_examples')
  assert sorted(os.listdir(transformed)) == ['Split-train', 'Split-validation']
  model_dir = os.path.join(_one(root, 'Trainer', 'model'), 'Format-Serving')
  training = json.load(open(os.path.join(model_dir, 'tflite', 'training.json')))
  opened = training['history']['inputs']
  assert [os.path.basename(d) for d in opened['train']] == ['Split-train']
  assert [os.path.basename(d) for d in opened['validation']] == ['Split-validation']
  assert all(d.startswith(transformed) for ds in opened.values() for d in ds)


def test_model_signatures_and_tflite(first_run):
  import tensorflow as tf
  from ai_edge_litert.interpreter import Interpreter
  from tests.helpers import TINY
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
  # serving's label order is Transform's vocabulary order (output index == label id)
  import tensorflow_transform as tft
  vocab = tft.TFTransformOutput(_one(cfg.path(cfg.pipeline.root), 'Transform',
                                     'transform_graph')).vocabulary_by_name('label_class')
  assert labels == [v.decode() for v in vocab]


def test_evaluation_and_blessing_agree_with_push(first_run):
  _, cfg, summary, _ = first_run
  assert summary['test_examples'] == summary['examples']['test']
  for m in summary['metrics'].values():
    assert 0.0 <= m['value'] <= 1.0
  gate = summary['int8_gate']
  assert set(gate) == {'top1_accuracy', 'top5_accuracy', 'int8_vs_float_top1_drop', 'seen_test_ads'}
  assert gate['seen_test_ads']['value'] == 0 and gate['seen_test_ads']['pass']  # never saw a test ad
  # 10 classes: chance is 0.10; the shipped int8 model must be far above it
  assert gate['top1_accuracy']['value'] >= 0.5, gate
  assert summary['int8_metrics']['examples'] == summary['examples']['test']
  # the int8 gate reads the same floors as TFMA; blessed only if both gates pass
  assert gate['top1_accuracy']['threshold'] == summary['metrics']['top1_accuracy']['threshold']
  passes = all(c['pass'] for c in gate.values()) and all(
      m['pass'] for m in summary['metrics'].values())
  assert summary['blessed'] == passes
  assert os.path.exists(summary['report'])
  pushed = glob.glob(os.path.join(cfg.path(cfg.push.dir), '*', 'model.tflite'))
  assert bool(pushed) == summary['blessed'] == summary['pushed']


def _rerun(first_run, tiny_dsn, push, **over):
  tmp, _, _, host = first_run
  cfg = _config(tmp, host.url_template, tiny_dsn, push=push,
                **{'pipeline.enable_cache': True, **over})
  run.run_direct(cfg)
  return cfg, summary_lib.summarize(cfg)


EASY = {'evaluate.top1_min': 0.0, 'evaluate.top5_min': 0.0, 'evaluate.max_regression': 1.0,
        'evaluate.max_int8_drop': 1.0}
# Re-trainings that test gating and warm starts, not quantisation: one int8 file, no layer
# ranking, a short calibration (TFLite conversion is most of a Trainer run on 2 cores).
QUICK_EXPORT = {'model.fast_file': False, 'model.tflite_float_layers': 0,
                'model.tflite_representative_samples': 16}


def test_blessed_model_is_pushed_whole_with_card_and_metadata(first_run, tiny_dsn):
  """Cache on: only the resolver, the gates and the Pusher run again."""
  from carvision.components.trainer import tflite_metadata
  cfg, s = _rerun(first_run, tiny_dsn, 'push_easy', **EASY)
  assert s['blessed'] and s['pushed']
  push_dir = cfg.path(cfg.push.dir)
  versions = os.listdir(push_dir)
  assert len(versions) == 1 and not versions[0].startswith('.partial')  # nothing half-written
  v = os.path.join(push_dir, versions[0])
  for name in ('model.tflite', 'model_fp16.tflite', 'labels.txt', 'model_card.json',
               'report.html', 'report.png', os.path.join('saved_model', 'saved_model.pb')):
    assert os.path.exists(os.path.join(v, name)), name
  labels = open(os.path.join(v, 'labels.txt')).read().splitlines()
  import json
  card = json.load(open(os.path.join(v, 'model_card.json')))
  for name in ('model.tflite', 'model_fp16.tflite'):
    md = tflite_metadata.read(open(os.path.join(v, name), 'rb').read())
    assert md['labels'] == labels  # the embedded label file round-trips
    assert md['version'] == card['version'] == versions[0]  # one version everywhere
    assert md['license'] == card['license'] == cfg.push.license and 'non-commercial' in md['license'].lower()
  ev = card['metrics']['test']['int8_tflite']
  assert ev['examples'] == s['examples']['test'] and 0 <= ev['top1_accuracy'] <= 1
  # which split did what, and the Trainer's inputs: train and validation, never test
  assert card['splits']['judged_on'] == 'test' and set(card['splits']['roles']) == {
      'train', 'validation', 'test'}
  opened = card['splits']['trainer_inputs']
  assert {os.path.basename(d) for d in opened['train']} == {'Split-train'}
  assert {os.path.basename(d) for d in opened['validation']} == {'Split-validation'}
  assert card['metrics']['validation']['float_keras']['class_top1'] >= 0
  # calibrated on validation (temperature baked into both heads), ECE reported on test
  cal = card['calibration']
  assert cal['split'] == 'validation' and cal['class']['temperature'] > 0 and cal['make']['temperature'] > 0
  # the temperature minimises the validation NLL (the ECE of 18 photos may move either way)
  assert cal['class']['nll_after'] <= cal['class']['nll_before'] + 1e-6
  assert cal['make']['nll_after'] <= cal['make']['nll_before'] + 1e-6
  assert 0 <= ev['ece'] <= 1
  assert card['thresholds']['top1_min'] == 0.0 and card['config']['model']['backbone']
  assert card['data']['ingestion']['rows'] == s['rows'] and len(card['data']['examples_fingerprint']) == 64
  assert card['files']['model.tflite']['bytes'] == os.path.getsize(os.path.join(v, 'model.tflite'))
  # the weights a later run continues from: the backbone and both heads, in float16
  import numpy as np
  with np.load(os.path.join(v, 'warm_start.npz')) as w:
    assert card['files']['warm_start.npz']['bytes'] == os.path.getsize(os.path.join(v, 'warm_start.npz'))
    assert w['class/kernel'].dtype == np.float16 and w['class/kernel'].shape[-1] == card['contract']['labels']
    assert any(k.startswith('backbone/') for k in w.files)
  assert card['code_version'] and card['timestamps']['pushed']
  assert 0 < card['wall_seconds'] < 3600  # launcher start (ingestion included) to push
  # what the shipped file does inside: the configured views, the layers kept float
  assert card['contract']['test_time_views'] == cfg.model.serving_views == ['full', 'flip', 'crop:0.875']
  kept = card['quantisation']['int8_float_layers']
  assert len(kept) == cfg.model.tflite_float_layers == 5 and all(k['rmse_per_scale'] > 0 for k in kept)
  # both heads in every file, each with its labels in the metadata
  makes = open(os.path.join(v, 'make_labels.txt')).read().splitlines()
  md = tflite_metadata.read(open(os.path.join(v, 'model.tflite'), 'rb').read())
  assert [(o['name'], o['labels']) for o in md['outputs']] == [
      ('probability', labels), ('make_probability', makes)]
  # the decision's thresholds, chosen on validation, travel with the model
  serve = json.load(open(os.path.join(v, 'serve.json')))
  assert serve == card['decision'] and set(serve['chosen_on'].values()) == {'validation'}
  assert 0 < serve['class_min_confidence'] <= 1 and 0 < serve['make_min_confidence'] <= 1
  ans = json.load(open(os.path.join(os.path.dirname(s['report']), 'metrics.json')))[
      'metrics']['answers']
  assert ans['decision']['class_min_confidence'] == serve['class_min_confidence']
  assert len(ans['class']['risk_coverage']['coverage']) == 20
  assert os.path.exists(os.path.join(v, 'risk_coverage.png'))
  # the single-view file: its own figures on the test split; shipped only if it passes
  fast = card['metrics']['test']['int8_tflite_fast']
  assert fast['examples'] == ev['examples'] and 'top1_vs_multi_view' in fast
  assert os.path.exists(os.path.join(v, 'model_fast.tflite')) == fast['passes_floors']


def test_impossible_threshold_blocks_the_push(first_run):
  """Both gates read the floor; a model under it is not blessed and nothing is pushed."""
  _, cfg, s, _ = first_run
  assert not s['blessed'] and not s['pushed']
  assert s['int8_gate']['top1_accuracy']['pass'] is False
  assert s['metrics']['top1_accuracy']['pass'] is False
  push_dir = cfg.path(cfg.push.dir)
  assert not os.path.exists(push_dir) or not os.listdir(push_dir)


def test_failing_parity_check_blocks_the_push(first_run, tiny_dsn):
  """Allow less int8-vs-float drop than this model has: the parity check alone blocks it."""
  _, _, first, _ = first_run
  drop = first['int8_gate']['int8_vs_float_top1_drop']['value']
  cfg, s = _rerun(first_run, tiny_dsn, 'push_parity',  # the int8 gate alone (no TFMA run)
                  **{**EASY, 'evaluate.max_int8_drop': drop - 0.01, 'evaluate.tfma': False})
  assert not s['blessed'] and not s['pushed']
  failed = [k for k, c in s['int8_gate'].items() if not c['pass']]
  assert failed == ['int8_vs_float_top1_drop']
  assert not os.listdir(cfg.path(cfg.push.dir)) if os.path.exists(cfg.path(cfg.push.dir)) else True


def test_serving_signature_equals_keras_model(first_run):
  """serving_default (JPEG bytes) == the Keras model on the same decoded photo, averaged over
  the configured test-time views (and != the plain single view: the views are really inside)."""
  import tensorflow as tf
  import tf_keras as keras
  from carvision.components import images
  from tests.helpers import TINY
  tmp, cfg, _, _ = first_run
  model_dir = os.path.join(_one(cfg.path(cfg.pipeline.root), 'Trainer', 'model'), 'Format-Serving')
  model = keras.models.load_model(model_dir)
  serve = tf.saved_model.load(model_dir).signatures['serving_default']
  photo = open(sorted(glob.glob(os.path.join(TINY, 'images', '*.jpg')))[0], 'rb').read()
  pixels = images.decode_tf(photo, cfg.model.image_size)[None]
  from carvision.components.trainer import model as M
  keras_probs = M.predict_views(model, pixels, cfg.model.serving_views)['class'].numpy()
  serving_probs = serve(images=tf.constant([photo]))['probabilities'].numpy()
  np.testing.assert_allclose(serving_probs, keras_probs, atol=1e-5)
  single = model(pixels, training=False)['class'].numpy()
  assert np.abs(serving_probs - single).max() > 1e-4


def test_predict_tflite_and_savedmodel_agree(first_run):
  from carvision.components import serving
  from tests.helpers import TINY
  tmp, cfg, _, _ = first_run
  model_dir = os.path.join(_one(cfg.path(cfg.pipeline.root), 'Trainer', 'model'), 'Format-Serving')
  lite = serving.load(model_dir, 'tflite')
  saved = serving.load(model_dir, 'savedmodel')
  assert lite.labels == saved.labels
  from carvision.components.example_gen import records
  jpegs = [open(p, 'rb').read() for p in sorted(glob.glob(os.path.join(TINY, 'images', '*.jpg')))]
  jpegs = [j for j in jpegs if records.validate_image(j, 40_000_000)[0] is None][:60]
  a, b = lite.predict_jpegs(jpegs), saved.predict_jpegs(jpegs)
  # through a quantised backbone: close on average and the same answer for most photos;
  # single probabilities can differ more.
  assert np.abs(a - b).mean() < 0.03, np.abs(a - b).mean()
  assert (a.argmax(1) == b.argmax(1)).mean() >= 0.8


def test_cli_predict_and_evaluate(first_run, capsys):
  import json
  from carvision.pipeline import cli
  from tests.helpers import TINY
  tmp, cfg, _, _ = first_run
  model_dir = os.path.join(_one(cfg.path(cfg.pipeline.root), 'Trainer', 'model'), 'Format-Serving')
  photos = sorted(glob.glob(os.path.join(TINY, 'images', '*.jpg')))[:2]
  assert cli.main(['predict', '--model', model_dir, '--json', '--top-k', '3', *photos]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(out) == 2 and len(out[0]['top_k']) == 3
  assert out[0]['top_k'][0]['label'] == '|'.join(
      (out[0]['top_k'][0]['make'], out[0]['top_k'][0]['model'], out[0]['top_k'][0]['submodel']))
  assert cli.main(['predict', '--model', model_dir, '--json', '--ad', '--top-k', '10', *photos]) == 0
  ad = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(ad['input']) == 2 and len(ad['top_k']) == 10  # one answer for the ad
  assert abs(sum(p['probability'] for p in ad['top_k']) - 1.0) < 0.05  # all 10 classes
  report = tmp / 'report'
  assert cli.main(['evaluate', '--config', 'demo', '--model', model_dir, '--data', TINY,
                   '--split', 'test', '--json', '--report', str(report),
                   '--top1-min', '0', '--top5-min', '0']) == 0
  m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # every decodable car photo of the test-split ads in labels.csv (ground truth, also for
  # ads whose database labels are broken), nothing from training ads
  import csv
  from carvision.components.example_gen import records
  rows = list(csv.DictReader(open(os.path.join(TINY, 'labels.csv'))))
  expected = sum(1 for r in rows if r['is_car'] == 'true' and r['file_ok'] == 'true'
                 and records.split_for(int(r['ad_id']), cfg.ingest.splits) == 'test')
  assert m['examples'] == expected
  assert 0.0 <= m['top1_accuracy'] <= m['top5_accuracy'] <= 1.0
  assert (report / 'report.html').exists() and (report / 'report.png').exists()


def test_run_fn_trains_every_stage_kind(first_run, tmp_path):
  """The Trainer's entry point on the first run's Transform output with one stage of each
  kind: heads on pooled activations, top blocks on cached activations, and end to end at a
  lower size than served (FixRes); the exported files keep the served size. The end-to-end
  stage drops its highest-loss photos (model.drop_high_loss), recorded in training.json."""
  import json
  from ai_edge_litert.interpreter import Interpreter
  from tfx import v1 as tfx
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 2, 'learning_rate': 3e-3},
            {'name': 'top', 'trainable': 'top_blocks', 'top_blocks': 1, 'cached': True,
             'epochs': 1, 'learning_rate': 1e-4},
            {'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 2, 'image_size': 96,
             'epochs': 1, 'learning_rate': 1e-4}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.drop_high_loss': 0.25, **SMALL})
  out = tmp_path / 'model'
  task.run_fn(tfx.components.FnArgs(
      train_files=[os.path.join(examples, 'Split-train', '*')],
      eval_files=[os.path.join(examples, 'Split-validation', '*')],
      transform_output=_one(root, 'Transform', 'transform_graph'),
      serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
      custom_config={'config': config_lib.trainer_config(tc).to_json()}))
  training = json.load(open(out / 'tflite' / 'training.json'))
  hist = training['history']['stages']
  assert [k for k in ('head', 'top', 'body') if k in hist] == ['head', 'top', 'body']
  assert hist['body']['image_size'] == 96 and 'image_size' not in hist['head']
  assert all(len(hist[k]['val_class_top1']) >= 1 and hist[k]['seconds'] > 0 for k in ('head', 'top', 'body'))
  interp = Interpreter(model_path=str(out / 'tflite' / 'model.tflite'))
  assert list(interp.get_input_details()[0]['shape']) == [1, cfg.model.image_size, cfg.model.image_size, 3]
  assert training['history']['calibration']['split'] == 'validation'
  assert training['history']['stages']['small_loss'] == {'share': 0.25, 'warmup_epochs': 2}


def test_early_learning_trains_end_to_end_with_every_train_photos_target(first_run, tmp_path):
  """model.early_learning: the end-to-end stage's batches carry the photo keys its targets
  are kept by (a batch without them is an error, so the run finishing says they arrived);
  the weight, the momentum and the photos are recorded in training.json. With the network's
  own audit after the first epoch, the second trains on the rest, relabelled ads included."""
  import json
  from tfx import v1 as tfx
  from carvision.components.trainer import label_noise as LN
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  train_files = [os.path.join(examples, 'Split-train', '*')]
  stages = [{'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 1, 'image_size': 96,
             'epochs': 2, 'learning_rate': 1e-4}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.early_learning': 3.0, 'model.drop_label_issues': True,
                                'model.label_audit_epoch': 1, 'model.label_audit_share': 0.1,
                                'model.label_audit_relabel': 0.02, **SMALL})
  out = tmp_path / 'model'
  task.run_fn(tfx.components.FnArgs(
      train_files=train_files,
      eval_files=[os.path.join(examples, 'Split-validation', '*')],
      transform_output=_one(root, 'Transform', 'transform_graph'),
      serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
      custom_config={'config': config_lib.trainer_config(tc).to_json()}))
  hist = json.load(open(out / 'tflite' / 'training.json'))['history']['stages']
  assert hist['early_learning'] == {'weight': 3.0, 'momentum': 0.7,
                                    'photos': len(LN.photo_ads(train_files))}
  assert len(hist['body']['val_class_top1']) == 2
  found = hist['label_issues']
  assert found['by'].startswith('the network') and found['ads'] and found['relabelled']
  assert found['photos_relabelled'] > 0


def test_label_audit_inside_training_flags_then_trains_on_the_rest(first_run, tmp_path):
  """model.label_audit_epoch: the first end-to-end stage trains its first epoch on every
  train photo, the network then audits the train ads, and the stage's later epochs (and the
  next stage) leave out exactly the photos of the flagged ads, recorded in training.json."""
  import json
  from tfx import v1 as tfx
  from carvision.components.trainer import label_noise as LN
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  train_files = [os.path.join(examples, 'Split-train', '*')]
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 2, 'learning_rate': 3e-3},
            {'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 2, 'image_size': 96,
             'epochs': 2, 'learning_rate': 1e-4, 'patience': 5},
            {'name': 'last', 'trainable': 'top_blocks', 'top_blocks': 1, 'epochs': 1,
             'learning_rate': 1e-5}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.drop_label_issues': True, 'model.label_audit_epoch': 1,
                                'model.label_audit_relabel': 0.02, **SMALL})
  out = tmp_path / 'model'
  task.run_fn(tfx.components.FnArgs(
      train_files=train_files,
      eval_files=[os.path.join(examples, 'Split-validation', '*')],
      transform_output=_one(root, 'Transform', 'transform_graph'),
      serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
      custom_config={'config': config_lib.trainer_config(tc).to_json()}))
  hist = json.load(open(out / 'tflite' / 'training.json'))['history']['stages']
  found = hist['label_issues']
  ads_of = LN.photo_ads(train_files)
  assert found['by'] == 'the network after 1 epochs of stage body'
  assert found['temperature'] > 0  # its probabilities calibrated on validation
  assert found['train_ads'] == len(set(ads_of.values()))
  assert set(found['ads']) <= set(ads_of.values())
  moved = dict(found['relabelled'])
  assert set(moved) <= set(found['ads']) and all(c >= 0 for c in moved.values())
  assert found['photos_relabelled'] == sum(a in moved for a in ads_of.values())
  assert found['photos_left_out'] == sum(a in set(found['ads']) - set(moved)
                                         for a in ads_of.values())
  assert len(hist['body']['val_class_top1']) == 2 and len(hist['last']['val_class_top1']) == 1


def test_label_audit_by_cross_fitting_scores_every_train_ad_out_of_fold(first_run, tmp_path):
  """model.label_audit_folds: each fold's model (the stages up to the first end-to-end one,
  trained without the fold's ads) scores that fold's photos, each fold's scores are kept
  under the resume directory, and the run trains without exactly the photos of the
  flagged ads."""
  import json
  from tfx import v1 as tfx
  from carvision.components.trainer import label_noise as LN
  from carvision.components.trainer import resume
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  train_files = [os.path.join(examples, 'Split-train', '*')]
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 2, 'learning_rate': 3e-3},
            {'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 2, 'image_size': 96,
             'epochs': 1, 'learning_rate': 1e-4}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.drop_label_issues': True, 'model.label_audit_folds': 2,
                                **SMALL})
  saved = []
  real = resume.Checkpoints.save_arrays

  def spy(self, name, arrays):
    real(self, name, arrays)
    saved.append((name, {k: v.copy() for k, v in self.load_arrays(name).items()}))
  out = tmp_path / 'model'
  resume.Checkpoints.save_arrays = spy
  try:
    task.run_fn(tfx.components.FnArgs(
        train_files=train_files,
        eval_files=[os.path.join(examples, 'Split-validation', '*')],
        transform_output=_one(root, 'Transform', 'transform_graph'),
        serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
        custom_config={'config': config_lib.trainer_config(tc).to_json(),
                       'resume_dir': str(tmp_path / 'resume')}))
  finally:
    resume.Checkpoints.save_arrays = real
  hist = json.load(open(out / 'tflite' / 'training.json'))['history']['stages']
  found = hist['label_issues']
  ads_of = LN.photo_ads(train_files)
  assert found['by'] == '2-fold cross-fitting of stages head, body'
  assert len(found['temperature']) == 2 and min(found['temperature']) > 0
  assert found['train_ads'] == len(set(ads_of.values()))
  assert set(found['ads']) <= set(ads_of.values())
  assert 'relabelled' not in found and found['photos_relabelled'] == 0
  assert found['photos_left_out'] == sum(a in set(found['ads']) for a in ads_of.values())
  # Two folds, each scoring its own photos; together every train photo once, and no ad
  # in both (folds are whole ads).
  assert [n for n, _ in saved] == ['label_audit/fold-0-of-2.npz', 'label_audit/fold-1-of-2.npz']
  keys = [set(a['keys'].tolist()) for _, a in saved]
  assert not keys[0] & keys[1] and keys[0] | keys[1] == set(ads_of)
  assert not {ads_of[k] for k in keys[0]} & {ads_of[k] for k in keys[1]}
  assert all(np.allclose(a['probs'].sum(-1), 1.0, atol=1e-3) for _, a in saved)
  assert [round(float(a['temperature']), 4) for _, a in saved] == found['temperature']
  # Kept beside the checkpoints until `carvision run` clears them after the run.
  assert len(glob.glob(str(tmp_path / 'resume' / 'Trainer' / '*' / 'label_audit' / 'fold-*.npz'))) == 2


def test_label_audit_pass_scores_every_train_ad_in_sample_then_starts_again(first_run, tmp_path):
  """model.label_audit_folds 1 with early_learning: one pass of the stages up to the first
  end-to-end one on every train ad scores all of them (one file under the resume directory),
  then the run trains from the start weights without the flagged ads (or with them
  relabelled). The pass's epochs are checkpointed: stopped after its first body epoch, the
  Trainer goes on from there, not from the start of the pass."""
  import json
  from tfx import v1 as tfx
  from carvision.components.trainer import label_noise as LN
  from carvision.components.trainer import resume
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  train_files = [os.path.join(examples, 'Split-train', '*')]
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 2, 'learning_rate': 3e-3},
            {'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 2, 'image_size': 96,
             'epochs': 2, 'learning_rate': 1e-4, 'patience': 5}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.drop_label_issues': True, 'model.label_audit_folds': 1,
                                'model.label_audit_share': 0.2, 'model.label_audit_relabel': 0.3,
                                'model.early_learning': 3.0, 'model.checkpoint_every_s': 0,
                                **SMALL})
  saved, written = [], []
  real_save, real_write = resume.Checkpoints.save_arrays, resume.Checkpoints.write

  class Stopped(Exception):
    pass

  def spy(self, name, arrays):
    real_save(self, name, arrays)
    saved.append((name, {k: v.copy() for k, v in self.load_arrays(name).items()}))

  def stop_after_the_first_fold_epoch(self, state, *args, **kw):
    real_write(self, state, *args, **kw)
    mid = state.get('stage') or {}
    written.append((mid.get('fold'), mid.get('index'), mid.get('epoch')))
    if written == [(0, 1, 1)]:
      raise Stopped()
  out = tmp_path / 'model'
  fn_args = tfx.components.FnArgs(
      train_files=train_files,
      eval_files=[os.path.join(examples, 'Split-validation', '*')],
      transform_output=_one(root, 'Transform', 'transform_graph'),
      serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
      custom_config={'config': config_lib.trainer_config(tc).to_json(),
                     'resume_dir': str(tmp_path / 'resume')})
  resume.Checkpoints.save_arrays = spy
  resume.Checkpoints.write = stop_after_the_first_fold_epoch
  try:
    with pytest.raises(Stopped):
      task.run_fn(fn_args)
    assert not saved  # stopped inside the pass
    task.run_fn(fn_args)
  finally:
    resume.Checkpoints.save_arrays, resume.Checkpoints.write = real_save, real_write
  # The pass went on at its second body epoch; then the run's own stages (no fold).
  assert written[:2] == [(0, 1, 1), (0, 1, 2)]
  assert all(f is None for f, _, _ in written[2:]) and (None, 1, 2) in written
  hist = json.load(open(out / 'tflite' / 'training.json'))['history']['stages']
  found = hist['label_issues']
  ads_of = LN.photo_ads(train_files)
  assert found['by'] == 'a pass of stages head, body on every train ad'
  assert found['train_ads'] == len(set(ads_of.values()))
  assert len(found['ads']) == round(0.2 * found['train_ads'])
  moved = {a for a, _ in found.get('relabelled', [])}
  assert moved <= set(found['ads'])
  assert found['photos_left_out'] == sum(a in set(found['ads']) - moved for a in ads_of.values())
  assert found['photos_relabelled'] == sum(a in moved for a in ads_of.values())
  # One pass scoring every train photo in sample.
  assert [n for n, _ in saved] == ['label_audit/fold-0-of-1.npz']
  assert set(saved[0][1]['keys'].tolist()) == set(ads_of)
  assert np.allclose(saved[0][1]['probs'].sum(-1), 1.0, atol=1e-3)
  # The run's own stages trained after the pass.
  assert len(hist['head']['val_class_top1']) == 2 and len(hist['body']['val_class_top1']) == 2


def test_label_audit_by_probes_leaves_out_the_flagged_ads(first_run, tmp_path):
  """model.drop_label_issues alone: out-of-fold linear probes of the frozen network audit the
  train ads before any stage; a share bounds how many go (label_audit_share); those with a
  likely enough other class stay, relabelled (label_audit_relabel)."""
  import json
  from tfx import v1 as tfx
  from carvision.components.trainer import label_noise as LN
  from carvision.components.trainer import task
  _, cfg, _, _ = first_run
  root = cfg.path(cfg.pipeline.root)
  examples = _one(root, 'Transform', 'transformed_examples')
  train_files = [os.path.join(examples, 'Split-train', '*')]
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 2, 'learning_rate': 3e-3}]
  tc = config_lib.load('demo', {'model.stages': stages, 'model.feature_views': 1,
                                'model.serving_views': ['full'], 'model.tflite_float_layers': 0,
                                'model.tflite_representative_samples': 8,
                                'model.drop_label_issues': True, 'model.label_audit_share': 0.1,
                                'model.label_audit_relabel': 0.02, **SMALL})
  out = tmp_path / 'model'
  task.run_fn(tfx.components.FnArgs(
      train_files=train_files,
      eval_files=[os.path.join(examples, 'Split-validation', '*')],
      transform_output=_one(root, 'Transform', 'transform_graph'),
      serving_model_dir=str(out), model_run_dir=str(tmp_path / 'logs'),
      custom_config={'config': config_lib.trainer_config(tc).to_json()}))
  found = json.load(open(out / 'tflite' / 'training.json'))['history']['stages']['label_issues']
  ads_of = LN.photo_ads(train_files)
  n_ads = len(set(ads_of.values()))
  assert found['by'] == 'out-of-fold linear probes' and found['train_ads'] == n_ads
  assert found['count'] == 'share 0.1 of the train ads'
  assert len(found['ads']) == round(0.1 * n_ads) and set(found['ads']) <= set(ads_of.values())
  moved = dict(found['relabelled'])
  assert moved and set(moved) <= set(found['ads']) and all(c >= 0 for c in moved.values())
  assert found['photos_relabelled'] == sum(a in moved for a in ads_of.values())
  assert found['photos_left_out'] == sum(a in set(found['ads']) - set(moved)
                                         for a in ads_of.values())


# Last two: they train more models in the same pipeline root.
def test_regression_against_better_blessed_model_blocks_the_push(first_run, tiny_dsn):
  """After a blessed model exists, a much worse one (1 epoch at a tiny rate) must not ship."""
  # blessed baseline (cached model; the int8 gate's blessing is what the resolver reads)
  _rerun(first_run, tiny_dsn, 'push_base', **{**EASY, 'evaluate.tfma': False})
  worse = [{'name': 'head', 'trainable': 'none', 'epochs': 1, 'learning_rate': 1e-5}]
  cfg, s = _rerun(first_run, tiny_dsn, 'push_worse',
                  **{**EASY, **QUICK_EXPORT, 'evaluate.max_regression': 0.01, 'model.stages': worse,
                     'model.feature_views': 1, 'evaluate.tfma': False})
  change = s['int8_gate']['top1_change_vs_blessed']
  assert change['value'] < -0.01 and not change['pass']
  assert not s['blessed'] and not s['pushed']
  assert not os.path.exists(cfg.path(cfg.push.dir)) or not os.listdir(cfg.path(cfg.push.dir))


def _new_span_with_a_new_class(tmp, splits):
  """exports/{1,2}/cars.csv: span 1 = the sample's export; span 2 = the same photos, with
  one class sold under a new submodel name (the catalogue renamed it): the vocabulary gains
  that name and loses the old one."""
  import csv
  from carvision.components.example_gen import records
  from tests.helpers import TINY
  rows = list(csv.DictReader(open(os.path.join(TINY, 'cars.csv'))))
  key = lambda r: (r['make'], r['model'], r['submodel'])  # noqa: E731
  chosen = sorted({key(r) for r in rows})[0]
  ads = [int(r['ad_id']) for r in rows if key(r) == chosen]
  assert 'train' in {records.split_for(a, splits) for a in ads}  # the vocabulary sees it
  new_class = '|'.join((chosen[0], chosen[1], chosen[2] + ' Facelift'))
  for span, relabel in ((1, False), (2, True)):
    os.makedirs(tmp / 'exports' / str(span), exist_ok=True)
    with open(tmp / 'exports' / str(span) / 'cars.csv', 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      for r in rows:
        if relabel and key(r) == chosen:
          r = {**r, 'submodel': r['submodel'] + ' Facelift'}
        w.writerow(r)
  return str(tmp / 'exports' / '{SPAN}' / 'cars.csv'), new_class, '|'.join(chosen)


def test_new_span_with_a_new_class_warm_starts_from_the_blessed_model(first_run, tiny_dsn):
  """Continuous training, the TFX way: the next export (span 2) has a class the blessed model
  never saw (and lost the name it replaces). The Trainer starts from the latest model the
  int8 gate blessed (the resolver's base_model): the 9 classes both know keep their head
  rows, the new one starts silent; the candidate is gated against the blessed model on the
  new test split (which the blessed model cannot get right for the new class) and pushed
  only because it passes. With
  memory budgets below the fixture's size (activations on disk, photos decoded every epoch),
  as a 100x larger data set would run."""
  import json
  tmp, cfg0, first, host = first_run
  prev = sorted(glob.glob(os.path.join(cfg0.path(cfg0.pipeline.root), 'Trainer', 'model', '*')),
                key=lambda d: int(os.path.basename(d)))[0]  # the first run's model, blessed by push_easy
  pattern, new_class, old_class = _new_span_with_a_new_class(tmp, cfg0.ingest.splits)
  short = [{'name': 'head', 'trainable': 'none', 'epochs': 8, 'learning_rate': 3e-3}]
  cfg, s = _rerun(first_run, tiny_dsn, 'push_warm',
                  **{**EASY, **QUICK_EXPORT, 'ingest.dsn': None, 'ingest.csv': pattern,
                     'evaluate.max_regression': 0.05, 'model.warm_start_stages': short,
                     'model.feature_views': 1, 'model.warm_start': 'latest_blessed',
                     'model.activation_cache_mb': 0, 'model.photo_cache_mb': 0,
                     'evaluate.tfma': False})
  change = s['int8_gate']['top1_change_vs_blessed']  # gated against the blessed model
  assert change['pass'] and s['blessed'] and s['pushed'], s['int8_gate']
  pushed = glob.glob(os.path.join(cfg.path(cfg.push.dir), '*'))
  assert len(pushed) == 1
  labels = open(os.path.join(pushed[0], 'labels.txt')).read().splitlines()
  assert len(labels) == 10 and new_class in labels and old_class not in labels
  card = json.load(open(os.path.join(pushed[0], 'model_card.json')))
  started = card['training']['warm_start']
  assert started['source'].startswith(prev)
  assert started['class']['kept'] == 9 and started['class']['new'] == [new_class]
  assert started['class']['dropped'] == [old_class]
  assert card['config']['model']['warm_start'] == 'latest_blessed'
  assert list(card['training']['stages']) and 'head' in card['training']['stages']
  stages = card['training']['stages']
  assert stages['activations_on_disk'] is True and stages['decoded_photos_in_memory'] is False
  # what the blessed model saw, the warm-started one has seen too (and the gate checked it)
  before = json.load(open(os.path.join(prev, 'Format-Serving', 'tflite', 'seen_ads.json')))
  after = json.load(open(os.path.join(pushed[0], 'seen_ads.json')))
  assert set(before['train']) <= set(after['train'])
  assert set(before['validation']) <= set(after['validation'])
  assert s['int8_gate']['seen_test_ads']['pass']


# What a run printed on 2026-12-01 before it was quiet by default (issue #25).
TODAYS_NOISE = ('oneDNN custom operations', 'Could not find cuda drivers', 'failed call to cuInit',
                'No semi_persistent_directory found', 'ArtifactQuery.property_predicate is not supported',
                'All log messages before absl::InitializeLog', 'payload_format custom property',
                'Tables initialized inside a tf.function', 'DeprecationWarning',
                'Instructions for updating', 'fully_quantize', 'trackable_obj',
                'No training configuration found')


def test_a_run_killed_mid_trainer_resumes_where_it_stopped(tiny_dsn, image_host, tmp_path):
  """SIGKILL while the Trainer is inside its end-to-end stage, then the same command: the
  nodes that completed (ExampleGen, Transform, ...) are not executed again, the Trainer goes on
  from its last epoch checkpoint, the card says it resumed, and the model is the
  uninterrupted run's within a few photos (the resumed epochs see the photos in another order)."""
  import json
  import signal
  import subprocess
  import sys
  import time
  import yaml
  from tests.helpers import REPO
  host = image_host
  stages = [{'name': 'head', 'trainable': 'none', 'epochs': 3, 'learning_rate': 3e-3},
            {'name': 'body', 'trainable': 'top_blocks', 'top_blocks': 2, 'image_size': 96,
             'epochs': 4, 'learning_rate': 1e-4, 'patience': 4}]
  over = {**EASY, **QUICK_EXPORT, 'model.stages': stages, 'model.feature_views': 1,
          'model.checkpoint_every_s': 0, 'evaluate.tfma': False}
  ref = _config(tmp_path / 'ref', host.url_template, tiny_dsn, **over)
  run.run_direct(ref)
  reference = summary_lib.summarize(ref)

  root = tmp_path / 'killed'
  settings = {'extends': os.path.join(REPO, 'configs', 'demo.yaml'), 'model': {}, 'evaluate': {},
              'pipeline': {'root': str(root), 'metadata': str(root / 'mlmd.sqlite')},
              'push': {'dir': str(tmp_path / 'killed_push')},
              'ingest': {'dsn': tiny_dsn, 'image_url_template': host.url_template}}
  for k, v in {**over, **SMALL}.items():
    section, key = k.split('.')
    settings[section][key] = v
  (tmp_path / 'resume.yaml').write_text(yaml.safe_dump(settings))
  cmd = [sys.executable, '-m', 'carvision.pipeline.cli', 'run', '--config', str(tmp_path / 'resume.yaml')]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  deadline = time.time() + 900
  while not glob.glob(str(root / '_resume' / 'Trainer' / '*' / 'epoch-*')):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)  # no clean-up of any kind
  proc.wait()
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
  assert '[carvision] resuming the stopped run (resume 1): kept CarAdsExampleGen' in res.stdout
  # quiet by default: progress lines, none of the libraries' start-up chatter
  for noise in TODAYS_NOISE:
    assert noise not in res.stderr and noise not in res.stdout, noise
  assert '[carvision] Trainer: stage 2/2 body' in res.stdout
  assert '[carvision] Trainer: stage head finished before the stop: kept' in res.stdout
  assert '[carvision] Trainer: stage body epoch 4/4, validation top-1 ' in res.stdout
  assert '[carvision] TFLiteEvaluator done in ' in res.stdout
  assert '[carvision] CarAdsExampleGen ...' not in res.stdout  # kept, not run again

  from ml_metadata.metadata_store import metadata_store
  from ml_metadata.proto import metadata_store_pb2
  conn = metadata_store_pb2.ConnectionConfig()
  conn.sqlite.filename_uri = str(root / 'mlmd.sqlite')
  store = metadata_store.MetadataStore(conn)
  node_runs = {}
  for ctx in store.get_contexts_by_type('node'):
    node = ctx.name.split('.', 1)[1]
    node_runs[node] = sum(e.last_known_state == metadata_store_pb2.Execution.COMPLETE
                          for e in store.get_executions_by_context(ctx.id))
  assert node_runs['CarAdsExampleGen'] == node_runs['Transform'] == 1, node_runs  # not again
  assert node_runs['Trainer'] == 1 and node_runs['VersionedPusher'] == 1, node_runs

  (version,) = glob.glob(str(tmp_path / 'killed_push' / '*'))
  card = json.load(open(os.path.join(version, 'model_card.json')))
  assert card['resumes'] == 1
  (resumed,) = card['training']['resumed']
  assert resumed['attempt'] == 2 and resumed['stages_done'] == 1 and resumed['stage_epoch'] >= 1
  assert len(card['training']['stages']['body']['val_class_top1']) == 4
  s = summary_lib.summarize(config_lib.load(str(tmp_path / 'resume.yaml')))
  for key in ('top1_accuracy', 'top5_accuracy'):
    assert abs(s['int8_gate'][key]['value'] - reference['int8_gate'][key]['value']) <= 0.1, key
  assert not (root / '_resume').exists()  # a finished run keeps no checkpoints

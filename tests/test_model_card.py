"""The Pusher's model card is a pure function of what the Trainer and the gate recorded."""
import datetime

from carvision.components.pusher.executor import model_card


def _inputs(**over):
  training = {'exported_at': '20261130T101010Z', 'config': {'model': {}},
              'history': {'train_seconds': 12.5, 'validation': {'class_top1': 0.7},
                          'inputs': {'train': ['x/Split-train'], 'validation': ['x/Split-validation']},
                          'calibration': {'split': 'validation', 'class': {'temperature': 0.8}},
                          'serve': {'class_min_confidence': 0.6, 'make_min_confidence': 0.5},
                          'serving': {'views': ['full', 'flip'], 'int8_float_layers': [{'layer': 'a'}],
                                      'int8_float_ops': ['SOFTMAX']},
                          'stages': {'head': {'class_top1': [0.2, 0.4], 'val_class_top1': [0.1, 0.3],
                                              'seconds': 3.0, 'loss': [2.0, 1.0]},
                                     'body': {'class_top1': [0.5], 'val_class_top1': [0.35],
                                              'image_size': 224, 'rolled_back': True, 'seconds': 9.0},
                                     'co_tuning': {'weight': 2.3, 'target_entropy': 3.9},
                                     'label_issues': {'ads': [11, 12], 'train_ads': 9, 'by': 'b'},
                                     'cache_seconds': 1.5}}}
  judged = {'split': 'test', 'gate': {'top1_min': 0.8},
            'checks': {'top1_accuracy': {'value': 0.81, 'threshold': 0.8, 'pass': True}},
            'metrics': {'examples': 40, 'top1_accuracy': 0.81, 'top5_accuracy': 0.97,
                        'make_accuracy': 0.9, 'ece': 0.02, 'answers': {'big': 'risk-coverage on the test split'},
                        'float': {'top1_accuracy': 0.8}}}
  args = dict(training=training, judged=judged,
              extras={'name': 'n', 'run_started': '2026-11-30T10:00:00+00:00', 'license': 'L',
                      'code_version': 'abc', 'command': 'carvision run'},
              files={'model.tflite': {'bytes': 3}}, ingest={'rows': 50}, version='v1', n_labels=10,
              examples_fingerprint='f' * 64, model_uri='/m/1',
              now=datetime.datetime(2026, 11, 30, 10, 5, tzinfo=datetime.timezone.utc))
  args.update(over)
  return args


def test_card_names_splits_figures_and_how_it_was_trained():
  card = model_card(**_inputs())
  test = card['metrics']['test']
  assert test['int8_tflite'] == {'examples': 40, 'top1_accuracy': 0.81, 'top5_accuracy': 0.97,
                                 'make_accuracy': 0.9, 'ece': 0.02,
                                 'answers': {'big': 'risk-coverage on the test split'}}
  assert test['float_savedmodel'] == {'top1_accuracy': 0.8} and test['int8_tflite_fast'] is None
  assert card['metrics']['validation']['float_keras'] == {'class_top1': 0.7}
  assert card['metrics']['train']['float_keras_last_epoch'] == {'class_top1': 0.5}
  assert card['splits']['judged_on'] == 'test' and card['splits']['trainer_inputs']['train']
  assert card['training']['stages']['body'] == {'val_class_top1': [0.35], 'image_size': 224,
                                                'rolled_back': True, 'seconds': 9.0}
  assert card['training']['stages']['cache_seconds'] == 1.5
  assert card['training']['stages']['co_tuning'] == {'weight': 2.3, 'target_entropy': 3.9}
  assert card['training']['stages']['label_issues'] == {'ads': 2, 'train_ads': 9, 'by': 'b'}
  assert card['decision']['class_min_confidence'] == 0.6
  assert card['contract']['test_time_views'] == ['full', 'flip'] and card['contract']['labels'] == 10
  assert card['quantisation']['int8_float_layers'] == [{'layer': 'a'}]
  assert card['wall_seconds'] == 300 and card['timestamps']['trained'] == '20261130T101010Z'
  assert card['version'] == 'v1' and card['license'] == 'L' and card['model_artifact'] == '/m/1'


def test_fast_file_figures_when_the_gate_scored_one():
  args = _inputs()
  args['judged']['metrics']['fast'] = {'top1_accuracy': 0.79, 'passes_floors': False}
  assert model_card(**args)['metrics']['test']['int8_tflite_fast']['passes_floors'] is False

"""The configuration is checked whole before any work starts: one line per problem naming
the key, the value given and what is allowed (issue: config validation)."""
import pytest

from carvision.pipeline import config


@pytest.mark.parametrize('override, message', [
    ({'evaluate.top1_min': 'high'}, "evaluate.top1_min='high': Input should be a valid number"),
    ({'evaluate.top1_min': 1.5}, 'evaluate.top1_min=1.5: Input should be less than or equal to 1'),
    ({'model.batch_size': -4}, 'model.batch_size=-4: Input should be greater than 0'),
    ({'model.feature_views': 65}, 'model.feature_views=65: Input should be less than or equal to 64'),
    ({'model.backbone': 'resnet50'}, "model.backbone='resnet50': one of efficientnet_lite0"),
    ({'ingest.splits': {'train': 0, 'validation': 0, 'test': 0}}, 'ingest.splits.train=0: a positive'),
    ({'ingest.max_dead_letter_share': -1}, 'ingest.max_dead_letter_share=-1: Input should be greater'),
    ({'ingest.http.concurrency': -5}, 'ingest.http.concurrency=-5: Input should be greater than 0'),
    ({'ingest.http': 5}, 'ingest.http=5: a section'),
    ({'model.warm_start': 'runs/no-such-model'}, "model.warm_start='runs/no-such-model': no such file"),
    ({'model.stages': [{'trainable': 'some'}]}, "model.stages[0].trainable='some': one of none, top_blocks, all"),
    ({'ingest.bogus': 1}, 'ingest.bogus: unknown key'),
    ({'ingest.image_url_template': 'http://host/photos/'}, 'must contain {p_hash}'),
    ({'ingest.p_hash_pattern': '(['}, 'not a regular expression'),
    ({'model.serving_views': ['mirror']}, "unknown view 'mirror'"),
    ({'model.stages': [{'name': 'h', 'trainable': 'none', 'image_size': 224}]},
     'model.stages[0] (h): image_size/augment apply to end-to-end stages only'),
    ({'model.warm_start_stages': [{'name': 'c', 'trainable': 'top_blocks', 'cached': True,
                                   'augment': 'light'}]},
     'model.warm_start_stages[0] (c): image_size/augment apply to end-to-end stages only'),
    ({'model.backbone': 'efficientnet_b0',
      'model.stages': [{'name': 'b', 'trainable': 'all', 'image_size': 200}]},
     'only EfficientNet-Lite backbones take any size'),
    ({'model.distribute': 'horovod'}, "model.distribute='horovod': one of auto"),
    ({'model.backbone': 'efficientnet_b0', 'model.stochastic_depth': 0.2},
     'model.stochastic_depth: only EfficientNet-Lite backbones have it'),
    ({'model.co_tuning': -1}, 'model.co_tuning=-1: Input should be greater than or equal to 0'),
    ({'model.drop_label_issues': True, 'model.label_audit_epoch': 30,
      'model.stages': [{'name': 'b', 'trainable': 'top_blocks', 'top_blocks': 2, 'epochs': 30}]},
     'model.label_audit_epoch 30: the first end-to-end stage of model.stages (b) has 30 epochs'),
    ({'model.drop_label_issues': True, 'model.label_audit_folds': 1},
     'model.label_audit_folds 1 (an in-sample audit pass) needs model.early_learning'),
    ({'model.label_audit_folds': 3},
     'model.label_audit_folds 3: applies to model.drop_label_issues, which is off'),
    ({'model.label_audit_share': 0.1},
     'model.label_audit_share 0.1: applies to model.drop_label_issues, which is off'),
    ({'model.label_audit_relabel': 0.5},
     'model.label_audit_relabel 0.5: applies to model.drop_label_issues, which is off'),
    ({'model.early_learning': 3, 'model.drop_high_loss': 0.1},
     'model.early_learning and model.drop_high_loss are two ways to train past wrong labels'),
    ({'model.early_learning_momentum': 1.0},
     'model.early_learning_momentum=1.0: Input should be less than 1'),
    ({'model.drop_label_issues': True, 'model.label_audit_folds': 2, 'model.label_audit_epoch': 1},
     'model.label_audit_folds and model.label_audit_epoch are two ways'),
])
def test_bad_values_are_named_before_any_work(override, message):
  with pytest.raises(config.ConfigError) as e:
    config.load('demo', override)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_the_warm_start_schedule_is_checked_only_where_it_can_train():
  """model.label_audit_epoch past the warm-start body's epochs: refused when the run may
  warm-start, accepted when it starts from ImageNet (the warm-start stages never run)."""
  audit = {'model.drop_label_issues': True, 'model.label_audit_epoch': 10}
  cfg = config.load('car_ads', {**audit, 'model.warm_start': 'none'})
  assert cfg.model.label_audit_epoch == 10
  with pytest.raises(config.ConfigError, match='model.warm_start_stages'):
    config.load('car_ads', {**audit, 'model.warm_start': 'latest_blessed'})


def test_set_reaches_list_items_and_names_a_bad_index():
  cfg = config.load('car_ads', {'model.stages.1.weight_decay': 0.05, 'model.stages.2.epochs': 4})
  assert cfg.model.stages[1].weight_decay == 0.05 and cfg.model.stages[2].epochs == 4
  assert cfg.model.stages[0].weight_decay == 0.0
  with pytest.raises(config.ConfigError, match=r'model.stages has 3 items; .7. is not one of 0..2'):
    config.load('car_ads', {'model.stages.7.epochs': 4})
  with pytest.raises(config.ConfigError, match='model.batch_size is a value, not a section'):
    config.load('car_ads', {'model.batch_size.x': 4})


def test_every_problem_is_named_at_once_and_a_password_is_never_echoed():
  with pytest.raises(config.ConfigError) as e:
    config.load('demo', {'model.batch_size': 0, 'evaluate.top5_min': 2,
                         'ingest.dsn': 'host=db dbname=seez password=hunter2'})
  text = str(e.value)
  assert 'model.batch_size=0' in text and 'evaluate.top5_min=2' in text
  assert 'contains a password' in text and 'hunter2' not in text


def test_shipped_configs_load_and_reach_the_trainer_typed():
  """The Trainer's part of each shipped config travels as JSON (custom_config) and is
  rebuilt typed, and validated again, by run_fn."""
  for name in ('default', 'demo', 'car_ads', 'dataflow'):
    cfg = config.load(name)
    sent = config.trainer_config(cfg)
    back = config.trainer_config_from_json(sent.to_json())
    assert back == sent and isinstance(back.model.stages[0], config.StageConfig)
  assert config.load('car_ads').model.stages[0].trainable == 'none'
  broken = config.trainer_config(config.load('demo')).as_dict()
  broken['model']['batch_size'] = 0
  import json
  with pytest.raises(config.ConfigError, match='batch_size'):
    config.trainer_config_from_json(json.dumps(broken))

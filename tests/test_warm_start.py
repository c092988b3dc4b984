"""Warm start from a previous model whose label vocabulary gained and lost classes."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from carvision.components import names
from carvision.components.backbone import efficientnet_lite as el
from carvision.components.trainer import model as M
from carvision.components.trainer import warm_start as W

SIZE = 64


def _model(classes, makes, variant='efficientnet_lite0', seed=0):
  base = el.build(variant, (SIZE, SIZE, 3))
  head = M.heads(int(base.output.shape[-1]), len(classes), len(makes), 0.0)
  full = M.classifier(base, head, SIZE)
  rng = np.random.default_rng(seed)
  full.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in full.get_weights()])
  return full


@pytest.fixture(scope='module')
def previous(tmp_path_factory):
  """A Trainer output: Format-Serving/ with the SavedModel and tflite/ label files."""
  root = tmp_path_factory.mktemp('prev')
  classes, makes = ['A|a|1', 'B|b|1', 'C|c|1'], ['A', 'B', 'C']
  prev = _model(classes, makes, seed=1)
  serving = root / names.SERVING_DIR
  prev.save(str(serving), save_format='tf', include_optimizer=False)
  (serving / names.TFLITE_DIR).mkdir()
  (serving / names.TFLITE_DIR / names.LABELS).write_text('\n'.join(classes) + '\n')
  (serving / names.TFLITE_DIR / names.MAKE_LABELS).write_text('\n'.join(makes) + '\n')
  return str(root), prev, classes, makes


def test_rows_are_mapped_by_label_new_classes_start_silent(previous):
  path, prev, _, _ = previous
  classes, makes = ['B|b|1', 'A|a|1', 'D|d|1'], ['B', 'A', 'D']  # C dropped, D new, order changed
  new = _model(classes, makes, seed=2)
  fresh_k, fresh_b = new.get_layer('heads').get_layer(M.CLASS_OUT).get_weights()
  record = W.warm_start(new, path, {M.CLASS_OUT: classes, M.MAKE_OUT: makes})
  assert record['source'].endswith(names.SERVING_DIR)
  assert record[M.CLASS_OUT] == {'kept': 2, 'new': ['D|d|1'], 'dropped': ['C|c|1']}
  assert record[M.MAKE_OUT] == {'kept': 2, 'new': ['D'], 'dropped': ['C']}
  old_k, old_b = prev.get_layer('heads').get_layer(M.CLASS_OUT).get_weights()
  k, b = new.get_layer('heads').get_layer(M.CLASS_OUT).get_weights()
  np.testing.assert_array_equal(k[:, 0], old_k[:, 1])  # B
  np.testing.assert_array_equal(k[:, 1], old_k[:, 0])  # A
  # D: silent until trained (no weights, the lowest kept bias): it takes no answers yet
  assert not k[:, 2].any() and np.abs(fresh_k[:, 2]).sum() > 0 and b[2] == old_b.min()
  assert b[0] == old_b[1]
  for ours, theirs in zip(M.backbone_of(new).get_weights(), M.backbone_of(prev).get_weights()):
    np.testing.assert_array_equal(ours, theirs)


def test_another_backbone_or_no_model_is_refused(previous):
  path, _, classes, makes = previous
  other = _model(classes, makes, variant='efficientnet_lite1')
  with pytest.raises(ValueError, match='another architecture'):
    W.warm_start(other, path, {M.CLASS_OUT: classes, M.MAKE_OUT: makes})
  with pytest.raises(FileNotFoundError, match='no warm_start.npz and no SavedModel'):
    W.warm_start(other, os.path.join(path, 'nowhere'), {})


def test_warm_start_setting():
  assert W.source(SimpleNamespace(warm_start='none'), '/m') is None
  assert W.source(SimpleNamespace(warm_start=None), '/m') is None
  assert W.source(SimpleNamespace(warm_start='latest_blessed'), None) is None  # first run
  assert W.source(SimpleNamespace(warm_start='latest_blessed'), '/m') == '/m'
  assert W.source(SimpleNamespace(warm_start='/p'), '/m') == '/p'


def test_the_weights_file_starts_a_run_as_the_saved_model_does(previous, tmp_path):
  """warm_start.npz (float16, beside the pushed labels) maps heads by label as the SavedModel."""
  _, prev, old_classes, old_makes = previous
  W.save_weights(prev, str(tmp_path / names.WARM_START))
  (tmp_path / names.LABELS).write_text('\n'.join(old_classes) + '\n')
  (tmp_path / names.MAKE_LABELS).write_text('\n'.join(old_makes) + '\n')
  classes, makes = ['C|c|1', 'A|a|1'], ['C', 'A']
  new = _model(classes, makes, seed=3)
  record = W.warm_start(new, str(tmp_path), {M.CLASS_OUT: classes, M.MAKE_OUT: makes})
  assert record['source'].endswith(names.WARM_START)
  assert record[M.CLASS_OUT] == {'kept': 2, 'new': [], 'dropped': ['B|b|1']}
  old_k, _ = prev.get_layer('heads').get_layer(M.CLASS_OUT).get_weights()
  k, _ = new.get_layer('heads').get_layer(M.CLASS_OUT).get_weights()
  np.testing.assert_allclose(k[:, 0], old_k[:, 2], rtol=1e-3, atol=1e-4)  # C
  for ours, theirs in zip(M.backbone_of(new).get_weights(), M.backbone_of(prev).get_weights()):
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)


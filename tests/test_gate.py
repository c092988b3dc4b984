"""The int8 gate's pure verdict (judge) and its input checks, on hand-made records."""
import pytest

from carvision.components.tflite_evaluator import executor

LABELS = ['A|a|1', 'A|b|1', 'B|c|1', 'B|d|1', 'C|e|1', 'C|f|1']
GATE = {'top1_min': 0.8, 'top5_min': 0.95, 'max_regression': 0.01, 'max_int8_drop': 0.01}


def _records(right, n=40, float_right=None, base_right=None, fast_right=None):
  """n photos of class 0; the first `right` answered class 0 by the int8 model, the rest class 2."""
  out = []
  for i in range(n):
    p = [0.0] * len(LABELS)
    p[0 if i < right else 2] = 0.9
    p[1] = 0.1
    fr = right if float_right is None else float_right
    rec = {'class': LABELS[0], 'ad_id': i // 2, 'int8': p,
           'float_top5': [0, 1, 2, 3, 4] if i < fr else [2, 3, 4, 5, 1]}
    if base_right is not None:
      rec['baseline_top1'] = LABELS[0] if i < base_right else LABELS[2]
    if fast_right is not None:
      q = [0.0] * len(LABELS)
      q[0 if i < fast_right else 2] = 1.0
      rec['fast'] = q
    out.append(rec)
  return out


def test_the_floor_itself_passes_and_one_photo_less_fails():
  ok = executor.judge(_records(32), LABELS, GATE, False)
  assert ok['checks']['top1_accuracy']['pass'] and ok['blessed']  # 32/40 = 0.80 exactly
  short = executor.judge(_records(31), LABELS, GATE, False)
  assert not short['checks']['top1_accuracy']['pass'] and not short['blessed']
  assert short['checks']['top5_accuracy']['pass']  # class 0 is second everywhere


def test_int8_parity_regression_and_the_fast_file():
  drop = executor.judge(_records(34, float_right=36), LABELS, GATE, False)
  assert not drop['checks']['int8_vs_float_top1_drop']['pass'] and not drop['blessed']
  worse = executor.judge(_records(34, base_right=36), LABELS, GATE, True)
  assert not worse['checks']['top1_change_vs_blessed']['pass']
  better = executor.judge(_records(36, base_right=34), LABELS, GATE, True)
  assert better['checks']['top1_change_vs_blessed']['pass'] and better['blessed']
  fast = executor.judge(_records(36, fast_right=30), LABELS, GATE, False)
  assert fast['blessed'] and not fast['metrics']['fast']['passes_floors']  # it decides only itself
  assert fast['metrics']['fast']['top1_vs_multi_view'] == pytest.approx(30 / 40 - 36 / 40)


def test_the_per_make_floor_is_optional_and_names_the_worst_make():
  gate = {**GATE, 'min_make_top1': 0.9, 'min_make_photos': 10}
  out = executor.judge(_records(34), LABELS, gate, False)
  assert not out['checks']['min_make_top1']['pass'] and 'worst make A' in out['checks']['min_make_top1']['detail']
  assert 'min_make_top1' not in executor.judge(_records(34), LABELS, GATE, False)['checks']


def test_a_model_that_saw_a_test_ad_is_not_blessed():
  """seen_ads.json (a warm start's inherited ads included) against the judged split's ads."""
  clean = executor.judge(_records(36), LABELS, GATE, False, seen={'train': {100, 101}, 'validation': {102}})
  assert clean['checks'][executor.SEEN_TEST_ADS] == {
      'value': 0, 'threshold': 0, 'pass': True, 'detail': "none of the 20 test ads in its seen_ads.json"}
  assert clean['blessed']
  dirty = executor.judge(_records(36), LABELS, GATE, False, seen={'train': {100, 7}, 'validation': {3}})
  check = dirty['checks'][executor.SEEN_TEST_ADS]
  assert check['value'] == 2 and not check['pass'] and not dirty['blessed']
  assert check['detail'].startswith('2 of 20 test ads') and 'e.g. ad 3' in check['detail']
  # a model that does not say what it saw: no such check (older models)
  assert executor.SEEN_TEST_ADS not in executor.judge(_records(36), LABELS, GATE, False)['checks']


def test_inputs_are_checked_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r"\['max_int8_drop'\] must be numbers"):
    executor.check_inputs({**GATE, 'max_int8_drop': 'x'}, 'test', str(tmp_path), str(tmp_path))
  with pytest.raises(ValueError, match="no examples in split 'test'"):
    executor.check_inputs(GATE, 'test', str(tmp_path), str(tmp_path))
  (tmp_path / 'Split-test').mkdir()
  (tmp_path / 'Split-test' / 'data.gz').write_bytes(b'')
  with pytest.raises(ValueError, match='has no tflite/model.tflite'):
    executor.check_inputs(GATE, 'test', str(tmp_path / 'model'), str(tmp_path))

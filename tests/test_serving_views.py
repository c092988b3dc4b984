"""Test-time views averaged inside the exported model, and the int8 TFLite's float head."""
import numpy as np
import pytest
import tensorflow as tf

from carvision.components.backbone import efficientnet_lite as el
from carvision.components.trainer import export
from carvision.components.trainer import model as M

SIZE = 64


@pytest.fixture(scope='module')
def small():
  base = el.pretrained('efficientnet_lite0', (SIZE, SIZE, 3))  # converted ImageNet weights at 64 px
  head = M.heads(int(base.output.shape[-1]), 7, 3, 0.0)
  full = M.classifier(base, head, SIZE)
  rng = np.random.default_rng(0)
  for w in head.weights:  # distinctive head weights: the zero-initialised bias alone says little
    w.assign(rng.normal(0, 0.03, w.shape).astype(np.float32))
  x = rng.integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.uint8)
  x[:, :, : SIZE // 2] //= 3  # left half darker: the mirror image is another photo
  return full, x


def test_bad_views_are_clear_errors():
  assert M.parse_views(['full', 'flip', 'crop:0.875']) == ['full', 'flip', 'crop:0.875']
  for bad, msg in (([], 'at least one'), (['mirror'], 'unknown view'), (['crop:1.5'], 'fraction'),
                   (['crop:x'], 'fraction')):
    with pytest.raises(ValueError, match=msg):
      M.parse_views(bad)


def test_views_average_logits_of_the_named_views(small):
  full, x = small
  plain = full(x, training=False)
  one = M.predict_views(full, x, ['full'])
  np.testing.assert_allclose(one[M.CLASS_OUT].numpy(), plain[M.CLASS_OUT].numpy(), atol=1e-6)
  both = M.predict_views(full, x, ['full', 'flip'])[M.CLASS_OUT].numpy()
  mirrored = M.predict_views(full, x[:, :, ::-1], ['full', 'flip'])[M.CLASS_OUT].numpy()
  np.testing.assert_allclose(both, mirrored, atol=1e-5)  # a photo and its mirror: same answer
  assert np.abs(both - plain[M.CLASS_OUT].numpy()).max() > 1e-3
  np.testing.assert_allclose(both.sum(axis=1), 1.0, atol=1e-5)
  # crop:0.5 is the central half of each side, resized back to the input size
  crop = M.predict_views(full, x, ['crop:0.5'])[M.CLASS_OUT].numpy()
  manual = tf.image.resize(tf.cast(x[:, 16:48, 16:48], tf.float32), (SIZE, SIZE))
  np.testing.assert_allclose(crop, full(manual, training=False)[M.CLASS_OUT].numpy(), atol=1e-5)


def test_int8_tflite_takes_uint8_and_outputs_float_probabilities(small):
  from ai_edge_litert.interpreter import Interpreter
  full, x = small
  int8, fp16, kept = export.to_tflite(full, SIZE, x, ['full', 'flip'], float_layers=2)
  want = M.predict_views(full, x, ['full', 'flip'])[M.CLASS_OUT].numpy()
  results = {}
  for kind, blob in (('int8', int8), ('fp16', fp16)):
    it = Interpreter(model_content=blob)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp['dtype'] == np.uint8 and list(inp['shape']) == [1, SIZE, SIZE, 3]
    assert out['dtype'] == np.float32 and out['quantization'] == (0.0, 0)
    got = []
    for img in x:
      it.set_tensor(inp['index'], img[None])
      it.invoke()
      got.append(it.get_tensor(out['index'])[0])
    got = results[kind] = np.stack(got)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(got - want).mean() < 0.05
    # the second output: the make head, same views
    make_out = it.get_output_details()[1]
    assert list(make_out['shape']) == [1, 3] and make_out['dtype'] == np.float32
    it.set_tensor(inp['index'], x[:1])
    it.invoke()
    np.testing.assert_allclose(it.get_tensor(make_out['index'])[0], M.predict_views(
        full, x[:1], ['full', 'flip'])[M.MAKE_OUT].numpy()[0], atol=0.05)
  # int8 backbone, float head: the probabilities are not multiples of 1/256 (no ties)
  ops = {o['op_name'] for o in Interpreter(model_content=int8)._get_ops_details()}  # pylint: disable=protected-access
  assert {'CONV_2D', 'FULLY_CONNECTED', 'SOFTMAX'} <= ops
  q = results['int8']
  assert not np.allclose(q * 256, np.round(q * 256), atol=1e-3)
  # the 2 layers with the largest int8 error stay float, and are named with their error
  assert len(kept) == 2 and kept[0]['rmse_per_scale'] >= kept[1]['rmse_per_scale'] > 0
  tensors = {t['name']: t['dtype'] for t in Interpreter(model_content=int8).get_tensor_details()}
  for k in kept:
    assert tensors[k['layer']] == np.float32, k
  # the single-view (fast) file: int8 only, its own most sensitive layers float
  fast, no_fp16, kept_fast = export.to_tflite(full, SIZE, x, ['full'], float_layers=1, fp16=False)
  assert no_fp16 is None and len(kept_fast) == 1
  fast_tensors = {t['name']: t['dtype'] for t in Interpreter(model_content=fast).get_tensor_details()}
  assert fast_tensors[kept_fast[0]['layer']] == np.float32
  # the same graph with no layers kept float: those tensors are int8 there
  int8_plain, _, none_kept = export.to_tflite(full, SIZE, x, ['full', 'flip'])
  assert none_kept == []
  plain = {t['name']: t['dtype'] for t in Interpreter(model_content=int8_plain).get_tensor_details()}
  for k in kept:
    assert plain[k['layer']] == np.int8, k


def test_trainer_refuses_inputs_outside_train_and_validation(tmp_path):
  """The gates judge the test split: a Trainer wired to read it must fail, not train."""
  from carvision.components.trainer import data
  files = {s: str(tmp_path / f'Split-{s}' / 'data.gz') for s in ('train', 'validation', 'test')}
  opened = data.check_inputs([files['train']], [files['validation']])
  assert opened == {'train': [str(tmp_path / 'Split-train')],
                    'validation': [str(tmp_path / 'Split-validation')]}
  for train, val in (([files['train']], [files['test']]), ([files['test']], [files['validation']]),
                     ([files['train'], files['test']], [files['validation']])):
    with pytest.raises(ValueError, match='train .fit. and validation .choices. only'):
      data.check_inputs(train, val)
  with pytest.raises(ValueError, match='both splits need examples'):
    data.check_inputs([files['train']], [])

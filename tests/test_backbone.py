"""The converted EfficientNet-Lite ImageNet weights behave like ImageNet weights."""
import os

import numpy as np
import pytest
from PIL import Image

from carvision.components.backbone import efficientnet_lite as el
from tests.helpers import TINY

# ImageNet classes of cars and their parts (sports car, convertible, minivan, ...).
CAR_CLASSES = {407, 436, 468, 511, 581, 609, 627, 656, 661, 717, 751, 817, 864, 867, 479,
               575, 675, 734, 555, 569, 803}


def _photos(size, n=6):
  import csv
  with open(os.path.join(TINY, 'labels.csv')) as f:
    good = [r['p_hash'] for r in csv.DictReader(f) if r['is_car'] == 'true' and r['file_ok'] == 'true']
  files = [os.path.join(TINY, 'images', h + '.jpg') for h in sorted(good)[:n]]
  return np.stack([np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BILINEAR))
                   for f in files])


def _write_official_checkpoint(model, variant: str, path: str, ema: bool = True,
                               raw_delta: float = 0.0) -> str:
  """Writes `model`'s weights under the official tensorflow/tpu variable names.

  With `ema`, the EMA shadows hold the weights and the raw variables the weights + raw_delta.
  """
  import tensorflow as tf
  from carvision.components.backbone import tf_checkpoint as tc
  names = tc.official_names(model, tc.VARIANTS[variant][1])
  variables = {}
  for layer in model.layers:
    for var, name in zip(layer.weights, names.get(layer.name, [])):
      variables[name] = tf.Variable(var.numpy() + (raw_delta if ema else 0.0))
      if ema:
        variables[name + '/ExponentialMovingAverage'] = tf.Variable(var.numpy())
  saver = tf.compat.v1.train.Saver(var_list=variables)
  return saver.save(sess=None, save_path=path)


@pytest.mark.parametrize('variant', ['efficientnet_lite0', 'efficientnet_lite2'])
def test_converted_weights_see_cars(variant):
  size = el.VARIANTS[variant][2]
  model = el.pretrained(variant, (size, size, 3), include_top=True)
  logits = model(el.normalise(_photos(size))).numpy()
  top5 = np.argsort(-logits, axis=1)[:, :5]
  hits = [len(set(row) & CAR_CLASSES) for row in top5]
  assert min(hits) >= 2, top5  # every car photo: at least 2 of its top-5 are car classes
  assert np.mean([row[0] in CAR_CLASSES for row in top5]) >= 0.8


def test_block_plan_matches_checkpoint():
  from carvision.components.backbone import torch_pickle
  for variant, blocks in (('efficientnet_lite0', 16), ('efficientnet_lite2', 21)):
    sd = torch_pickle.load(el.pytorch_weights_path(variant))
    assert sum(k.endswith('._project_conv.weight') for k in sd) == len(el.block_plan(variant)) == blocks


def test_untrusted_pickle_is_refused(tmp_path):
  import pickle
  from carvision.components.backbone import torch_pickle
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    pickle.dump(torch_pickle._LEGACY_MAGIC, f)
    pickle.dump(1001, f)
    pickle.dump({}, f)
    pickle.dump(os.system, f)
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    torch_pickle.load(str(path))


@pytest.mark.parametrize('variant', ['efficientnet_lite0', 'efficientnet_lite2'])
def test_logits_match_original_pytorch_implementation(variant):
  """tests/reference/make_reference.py computed these with efficientnet-lite-pytorch + torch."""
  ref = np.load(os.path.join(os.path.dirname(__file__), 'reference', 'efficientnet_lite_logits.npz'))
  size = el.VARIANTS[variant][2]
  photos = _photos(size, n=4)
  model = el.pretrained(variant, (size, size, 3), include_top=True)
  ours = model(el.normalise(photos)).numpy()
  expected = ref[variant]
  scale = np.abs(expected).max()
  assert np.abs(ours - expected).max() <= 2e-3 * scale, np.abs(ours - expected).max()
  np.testing.assert_array_equal(np.argsort(-ours, 1)[:, :5], np.argsort(-expected, 1)[:, :5])


def test_split_network_equals_whole():
  """upper(lower(x)) == base(x): what makes training the top on cached activations exact."""
  variant, size = 'efficientnet_lite0', 224
  base = el.pretrained(variant, (size, size, 3))
  x = el.normalise(_photos(size, n=2))
  for top in (1, 4, len(el.block_plan(variant))):
    lower, upper = el.split(base, variant, top)
    np.testing.assert_allclose(upper(lower(x)).numpy(), base(x).numpy(), atol=1e-4)
    assert {l.name for l in upper.layers if l.weights} <= {l.name for l in base.layers}
  # weights written back land in the whole network
  upper.get_layer('head_conv').set_weights([np.zeros_like(w) for w in upper.get_layer('head_conv').get_weights()])
  el.copy_weights(upper, base)
  assert not base.get_layer('head_conv').get_weights()[0].any()


def test_stochastic_depth_drops_residual_branches_in_training_only():
  """Same weights with and without it; at inference the same answers, in training some
  photos' residual branches are dropped (a different output), and none without residuals."""
  import tensorflow as tf
  variant, size = 'efficientnet_lite0', 224
  plain = el.pretrained(variant, (size, size, 3))
  deep = el.pretrained(variant, (size, size, 3), stochastic_depth=0.5)
  drops = [l for l in deep.layers if l.name.endswith('_drop')]
  residual = [l for l in deep.layers if l.name.endswith('_add')]
  assert drops and len(drops) == len(residual)
  assert not any(l.name.endswith('_drop') for l in plain.layers)
  assert drops[-1].rate > drops[0].rate and drops[-1].rate < 0.5
  x = el.normalise(_photos(size, n=2))
  np.testing.assert_allclose(deep(x, training=False).numpy(), plain(x).numpy(), atol=1e-5)
  from carvision.components.trainer import model as M
  for m in (plain, deep):  # as the Trainer trains them: BatchNormalization frozen
    M.set_trainable(m, 'all')
  np.testing.assert_allclose(plain(x, training=True).numpy(), plain(x).numpy(), atol=1e-5)
  tf.random.set_seed(0)
  assert np.abs(deep(x, training=True).numpy() - plain(x).numpy()).max() > 1e-3


def test_tf_checkpoint_with_official_names_converts_exactly(tmp_path):
  """A checkpoint written under the official tensorflow/tpu names (EMA shadows preferred)."""
  import tensorflow as tf
  from carvision.components.backbone import tf_checkpoint as tc
  src = tc.build('efficientnet_b0', (64, 64, 3))
  for w in src.weights:  # distinctive weights, not the initialiser's
    if 'normalization' not in w.name and w.dtype == tf.float32:
      w.assign(tf.random.stateless_normal(w.shape, seed=[len(w.name), 1]) * 0.05 +
               (1.0 if 'variance' in w.name else 0.0))
  # EMA shadows = the weights; the raw variables are deliberately different
  path = _write_official_checkpoint(src, 'efficientnet_b0', str(tmp_path / 'model.ckpt'),
                                     raw_delta=0.5)
  names = {n for n, _ in tf.train.list_variables(path)}
  assert 'efficientnet-b0/blocks_0/depthwise_conv2d/depthwise_kernel/ExponentialMovingAverage' in names
  assert 'efficientnet-b0/blocks_1/tpu_batch_normalization_2/moving_variance' in names
  assert 'efficientnet-b0/head/conv2d/kernel' in names
  dst = tc.build('efficientnet_b0', (64, 64, 3))
  n, ema = tc.load(dst, 'efficientnet_b0', path)
  assert ema and n == sum(len(l.weights) for l in src.layers
                          if l.weights and not l.name.startswith(('normalization', 'rescaling')))
  x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  np.testing.assert_allclose(dst(x).numpy(), src(x).numpy(), atol=1e-5)


def test_tf_checkpoint_missing_variable_is_a_clear_error(tmp_path):
  import tensorflow as tf
  from carvision.components.backbone import tf_checkpoint as tc
  v = tf.Variable(np.zeros((3, 3, 3, 32), np.float32))
  path = tf.compat.v1.train.Saver(var_list={'efficientnet-b0/stem/conv2d/kernel': v}).save(
      None, str(tmp_path / 'partial.ckpt'))
  with pytest.raises(ValueError, match='lacks efficientnet-b0/stem/tpu_batch_normalization'):
    tc.load(tc.build('efficientnet_b0', (64, 64, 3)), 'efficientnet_b0', path)


def test_bbox_crop_keeps_the_car():
  import tensorflow as tf
  from carvision.components import images
  img = np.zeros((100, 200, 3), np.uint8)
  img[20:60, 50:150] = 255  # the "car"
  jpeg = tf.io.encode_jpeg(img, quality=100)
  box = tf.constant([0.2, 0.25, 0.6, 0.75])
  crop = images.crop_to_box_tf(images.decode_full_tf(jpeg), box, margin=0.0).numpy()
  assert crop.shape[:2] == (40, 100) and crop.mean() > 240
  always = images.augment_tf(images.decode_full_tf(jpeg), 32, box=box, crop_prob=1.0).numpy()
  never = images.augment_tf(images.decode_full_tf(jpeg), 32, box=box, crop_prob=0.0).numpy()
  assert always.shape == never.shape == (32, 32, 3)
  assert always.mean() > never.mean()  # cropped views are mostly car


def test_set_trainable_opens_only_the_named_blocks():
  """Regression: setting the model's own `trainable` after the per-layer flags used to
  unfreeze BN and every block (set_trainable now sets it first)."""
  import tf_keras as keras
  from carvision.components.trainer import model as M
  base = el.build('efficientnet_lite2', (64, 64, 3))
  blocks = el.block_names(base)
  n_conv = lambda ws: {w.name.split('/')[0] for w in ws}
  M.set_trainable(base, 'none')
  assert not base.trainable_weights
  M.set_trainable(base, 'top_blocks', 14)
  open_layers = n_conv(base.trainable_weights)
  assert open_layers and all(any(n.startswith(p) for p in blocks[-14:] + ['top_', 'head_'])
                             for n in open_layers), sorted(open_layers)
  assert not any(n.startswith(p) for n in open_layers for p in blocks[:7])
  M.set_trainable(base, 'all')
  assert {n.split('_')[0] for n in n_conv(base.trainable_weights)} >= {b.rstrip('_') for b in blocks}
  for mode in ('top_blocks', 'all'):
    M.set_trainable(base, mode, 14)
    bn = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and not any(l.trainable or l.trainable_weights for l in bn)

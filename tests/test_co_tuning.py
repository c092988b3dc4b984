"""Co-Tuning: the kept head is ImageNet's, its target is each class's mean ImageNet
distribution, and training through it trains the model that is exported."""
import numpy as np
import pytest

from carvision.components.backbone import efficientnet_lite as el
from carvision.components.trainer import co_tuning as CT
from carvision.components.trainer import model as M
from tests.test_backbone import _photos

VARIANT = 'efficientnet_lite0'


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_relationship_is_the_mean_imagenet_distribution_of_each_class():
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  pooled = rng.normal(size=(9, 8)).astype(np.float16)
  classes = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1])
  rel = CT.relationship(pooled, classes, kernel, bias, n_classes=3, batch=4)
  p = _softmax(pooled.astype(np.float32) @ kernel + bias)
  np.testing.assert_allclose(rel[0], p[classes == 0].mean(0), rtol=1e-5)
  np.testing.assert_allclose(rel[1], p[classes == 1].mean(0), rtol=1e-5)
  np.testing.assert_allclose(rel[2], p.mean(0), rtol=1e-5)  # no rows: the overall mean
  np.testing.assert_allclose(rel.sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='no train rows'):
    CT.relationship(pooled[:0], classes[:0], kernel, bias, 3)


def test_the_kept_head_is_the_imagenet_classifier_and_training_trains_the_exported_model():
  import tensorflow as tf
  from carvision.components.trainer import task
  photos = _photos(128, n=4)
  reference = el.pretrained(VARIANT, include_top=True)
  want = _softmax(reference(el.normalise(photos), training=False).numpy())
  base = M.backbone(VARIANT, 'imagenet', 128)
  full = M.classifier(base, M.heads(1280, 3, 2, 0.0), 128)
  net = CT.training_model(full, CT.head_layer(*el.imagenet_head(VARIANT)))
  got = net(photos, training=False)
  np.testing.assert_allclose(got[CT.IMAGENET_OUT].numpy(), want, atol=1e-4)
  np.testing.assert_allclose(got[M.CLASS_OUT].numpy(), full(photos)[M.CLASS_OUT].numpy(), atol=1e-6)

  rel = np.full((3, 1000), 1e-3, np.float32)
  rel[:, 817] = 1.0 - 999e-3  # every class: "sports car"
  M.set_trainable(base, 'top_blocks', 1)
  task._compile(net, 1e-3, 0.0, (rel, 5.0))  # pylint: disable=protected-access
  y = {M.CLASS_OUT: np.eye(3, dtype=np.float32)[[0, 1, 2, 0]],
       M.MAKE_OUT: np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]}
  train = CT.with_target(tf.data.Dataset.from_tensor_slices((photos, y)).batch(4))
  top_before = full.get_layer(base.name).get_layer('head_conv').get_weights()[0].copy()
  before = net.evaluate(train, return_dict=True, verbose=0)['imagenet_loss']
  net.fit(train, epochs=5, verbose=0)
  after = net.evaluate(train, return_dict=True, verbose=0)['imagenet_loss']
  assert after < before  # trained towards the soft target
  moved = np.abs(full.get_layer(base.name).get_layer('head_conv').get_weights()[0] - top_before)
  assert moved.max() > 0  # the exported model's own layers were trained
  assert sorted(full.output_names) == [M.CLASS_OUT, M.MAKE_OUT]  # no ImageNet output ships


def test_the_loss_is_cross_entropy_against_the_row_of_the_listed_class():
  import tensorflow as tf
  rel = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]], np.float32)
  pred = np.array([[0.2, 0.3, 0.5]], np.float32)
  got = CT.loss(rel)(tf.constant([[0.0, 1.0]]), tf.constant(pred)).numpy()
  np.testing.assert_allclose(got, -(0.1 * np.log(0.2) + 0.1 * np.log(0.3) + 0.8 * np.log(0.5)),
                             rtol=1e-5)

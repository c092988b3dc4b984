"""The classifier: uint8 pixels in, normalisation and EfficientNet-Lite inside, two heads out."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import tensorflow as tf
import tf_keras as keras

from carvision.components.backbone import efficientnet_lite as el
from carvision.components.views import parse_views  # noqa: F401  (M.parse_views for callers)

CLASS_OUT, MAKE_OUT = 'class', 'make'


def raw_pixel_input(name: str) -> bool:
  """EfficientNet-B (Keras applications) normalises inside; Lite takes (x - 127) / 128."""
  from carvision.components.backbone import tf_checkpoint  # pylint: disable=g-import-not-at-top
  return name in tf_checkpoint.VARIANTS


def backbone(name: str, weights: Optional[str], size: int,
             stochastic_depth: float = 0.0) -> keras.Model:
  """The ImageNet (or untrained, weights 'none') network `name`; model.backbone/weights/image_size
  and model.stochastic_depth (EfficientNet-Lite only)."""
  if raw_pixel_input(name):
    from carvision.components.backbone import tf_checkpoint  # pylint: disable=g-import-not-at-top
    if weights in (None, 'none'):
      return tf_checkpoint.build(name, (size, size, 3))
    if weights == 'imagenet':
      raise ValueError(f"{name}: set model.weights to an official TF EfficientNet "
                       'checkpoint path (e.g. noisy-student .../model.ckpt); nothing is downloaded')
    return tf_checkpoint.pretrained(name, weights, (size, size, 3))
  # Any input size (fully convolutional): stages may train at a lower size than the one
  # served (FixRes); exported files fix the serving size in their signatures.
  if weights == 'imagenet':
    return el.pretrained(name, (None, None, 3), stochastic_depth=stochastic_depth)
  if weights in (None, 'none'):
    return el.build(name, (None, None, 3), stochastic_depth=stochastic_depth)
  raise ValueError(f"model.weights must be 'imagenet' or 'none', got {weights!r}")


def heads(n_features: int, n_classes: int, n_makes: int, dropout: float) -> keras.Model:
  """Pooled features -> class and make probabilities (trained alone on cached features first)."""
  feats = keras.Input((n_features,), name='features')
  x = keras.layers.Dropout(dropout, name='head_dropout')(feats)
  # float32 outputs under a mixed-precision policy too: probabilities need the precision
  out = {CLASS_OUT: keras.layers.Dense(n_classes, activation='softmax', name=CLASS_OUT,
                                       dtype='float32')(x),
         MAKE_OUT: keras.layers.Dense(n_makes, activation='softmax', name=MAKE_OUT,
                                      dtype='float32')(x)}
  return keras.Model(feats, out, name='heads')


def normalise(base_name: str, x):
  """What the backbone expects from 0..255 pixels (used where activations are cached)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.cast(x, tf.float32) if raw_pixel_input(base_name) else el.normalise(x)


def classifier(base: keras.Model, head: keras.Model, size: int) -> keras.Model:
  """uint8 [N, size, size, 3] (any value range 0..255) -> {class, make} probabilities.

  A backbone of any input size gives a classifier of any input size (trained at one size,
  served at another); `size` is the one it is served at.
  """
  dynamic = base.input_shape[1] is None
  pixels = keras.Input((None, None, 3) if dynamic else (size, size, 3), name='pixels')
  # Built-in layer (not a Lambda), so the saved model reloads anywhere: (x - MEAN) / STD.
  if raw_pixel_input(base.name):
    x = keras.layers.Rescaling(1.0, name='normalise')(pixels)  # the B backbone normalises itself
  else:
    x = keras.layers.Rescaling(1.0 / el.STD, offset=-el.MEAN / el.STD, name='normalise')(pixels)
  return keras.Model(pixels, named(head(base(x))), name='carvision')


def named(outputs: Dict) -> Dict:
  """Names a nested model's outputs `class` / `make`, so metrics read `val_class_top1`."""
  return {k: keras.layers.Activation('linear', name=k)(v) for k, v in outputs.items()}


def _view(x, view: str):
  if view == 'full':
    return x
  if view == 'flip':
    return tf.reverse(x, axis=[2])
  size = x.shape[1:3]
  return tf.image.resize(tf.image.central_crop(x, float(view[5:])), size, method='bilinear')


def predict_views(full: keras.Model, pixels, views: Sequence[str]) -> Dict:
  """{class, make} probabilities of `full`, averaged over test-time views of each photo.

  The views run as one batch through the backbone; their pooled features are averaged
  before the (linear) heads, i.e. the logits are averaged, so the softmax is computed
  once. With only `full` this is exactly `full(pixels)`.
  """
  views = parse_views(views)
  if views == ['full']:
    return dict(full(pixels, training=False))
  x = tf.cast(pixels, tf.float32)
  norm = full.get_layer('normalise')
  head = full.get_layer('heads')
  base = backbone_of(full)
  feats = base(norm(tf.concat([_view(x, v) for v in views], axis=0)), training=False)
  n_feat = int(feats.shape[-1])
  feats = tf.reduce_mean(tf.reshape(feats, [len(views), -1, n_feat]), axis=0)
  return dict(head(feats, training=False))


def backbone_of(full: keras.Model) -> keras.Model:
  """The backbone inside a classifier built by `classifier` (the nested model not `heads`)."""
  head = full.get_layer('heads')
  return next(l for l in full.layers if isinstance(l, keras.Model) and l is not head)


def set_trainable(base: keras.Model, mode: str, top_blocks: int = 0) -> None:
  """none: frozen; top_blocks: the last N blocks and the head conv; all: everything.

  BatchNormalization stays frozen (inference statistics) in every mode: with small
  batches on CPU, updating it hurts more than it helps.
  """
  # First the model, then each layer: setting a Keras model's `trainable` sets it on every
  # layer inside, so doing it last would unfreeze BatchNormalization and the lower blocks.
  base.trainable = mode != 'none'
  blocks = el.block_names(base)
  open_prefixes = set()
  if mode == 'top_blocks':
    open_prefixes = set(blocks[len(blocks) - int(top_blocks):]) | {'head_', 'top_'}
  for layer in base.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.trainable = False
    elif mode == 'all':
      layer.trainable = True
    elif mode == 'top_blocks':
      layer.trainable = any(layer.name.startswith(p) for p in open_prefixes)
    elif mode == 'none':
      layer.trainable = False
    else:
      raise ValueError(f'unknown trainable mode {mode!r}')


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to `peak`, then cosine decay to zero over `total` steps."""

  def __init__(self, peak: float, total: int, warmup: int):
    super().__init__()
    self.peak, self.total, self.warmup = float(peak), max(1, int(total)), max(0, int(warmup))

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = self.peak * (step + 1.0) / float(max(1, self.warmup))
    progress = (step - self.warmup) / float(max(1, self.total - self.warmup))
    cos = 0.5 * self.peak * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
    return tf.where(step < self.warmup, warm, cos)

  def get_config(self) -> Dict:
    return {'peak': self.peak, 'total': self.total, 'warmup': self.warmup}

"""EfficientNet-B0..B3 from an official TensorFlow EfficientNet checkpoint (our `convert_efficientnet`).

The official checkpoints (tensorflow/tpu models/official/efficientnet, e.g. the
noisy-student ones) are name-based TF1 checkpoints: `efficientnet-b0/blocks_3/conv2d/kernel`,
`.../tpu_batch_normalization_1/moving_mean`, optionally with `/ExponentialMovingAverage`
shadows (preferred when present, as the official evaluation does). The network is
tf_keras' `applications.EfficientNetB*` (include_top=False, average pooling); its
input is raw pixels 0..255 — the model normalises with ImageNet mean/std itself.
Every weight of the Keras graph must be found with the right shape, or this fails.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

VARIANTS = {  # ours -> (tf_keras.applications constructor, official scope, native size)
    'efficientnet_b0': ('EfficientNetB0', 'efficientnet-b0', 224),
    'efficientnet_b1': ('EfficientNetB1', 'efficientnet-b1', 240),
    'efficientnet_b2': ('EfficientNetB2', 'efficientnet-b2', 260),
    'efficientnet_b3': ('EfficientNetB3', 'efficientnet-b3', 300),
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_BN = ('gamma', 'beta', 'moving_mean', 'moving_variance')


def build(variant: str, input_shape=(None, None, 3)):
  """The Keras EfficientNet-B backbone (raw pixels in, pooled features out), no weights."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  if variant not in VARIANTS:
    raise ValueError(f'unknown backbone {variant!r}; TF-checkpoint backbones: {sorted(VARIANTS)}')
  ctor = getattr(keras.applications, VARIANTS[variant][0])
  model = ctor(include_top=False, weights=None, input_shape=input_shape, pooling='avg')
  norm = [l for l in model.layers if isinstance(l, keras.layers.Normalization)]
  for layer in norm:  # x/255 then (x - mean) / std, the official preprocessing
    layer.set_weights([IMAGENET_MEAN, IMAGENET_STD ** 2, np.array(0, np.int64)][:len(layer.weights)])
  return keras.Model(model.inputs, model.outputs, name=variant)


def _keras_blocks(model) -> List[str]:
  names = []
  for layer in model.layers:
    if layer.name.startswith('block'):
      b = layer.name.split('_')[0]
      if b not in names:
        names.append(b)
  return names


def official_names(model, scope: str) -> Dict[str, List[str]]:
  """Keras layer name -> official variable names of its weights, in Keras' weight order."""
  out: Dict[str, List[str]] = {
      'stem_conv': [f'{scope}/stem/conv2d/kernel'],
      'stem_bn': [f'{scope}/stem/tpu_batch_normalization/{w}' for w in _BN],
      'top_conv': [f'{scope}/head/conv2d/kernel'],
      'top_bn': [f'{scope}/head/tpu_batch_normalization/{w}' for w in _BN],
  }
  for i, kb in enumerate(_keras_blocks(model)):
    t = f'{scope}/blocks_{i}'
    has_expand = any(l.name == f'{kb}_expand_conv' for l in model.layers)
    bn_dw, bn_proj = ('tpu_batch_normalization_1', 'tpu_batch_normalization_2') if has_expand \
        else ('tpu_batch_normalization', 'tpu_batch_normalization_1')
    if has_expand:
      out[f'{kb}_expand_conv'] = [f'{t}/conv2d/kernel']
      out[f'{kb}_expand_bn'] = [f'{t}/tpu_batch_normalization/{w}' for w in _BN]
    out[f'{kb}_dwconv'] = [f'{t}/depthwise_conv2d/depthwise_kernel']
    out[f'{kb}_bn'] = [f'{t}/{bn_dw}/{w}' for w in _BN]
    out[f'{kb}_se_reduce'] = [f'{t}/se/conv2d/kernel', f'{t}/se/conv2d/bias']
    out[f'{kb}_se_expand'] = [f'{t}/se/conv2d_1/kernel', f'{t}/se/conv2d_1/bias']
    out[f'{kb}_project_conv'] = [f'{t}/conv2d_1/kernel' if has_expand else f'{t}/conv2d/kernel']
    out[f'{kb}_project_bn'] = [f'{t}/{bn_proj}/{w}' for w in _BN]
  return out


def load(model, variant: str, checkpoint: str, use_ema: Optional[bool] = None) -> Tuple[int, bool]:
  """Copies a checkpoint into `model`; returns (weights loaded, EMA used)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(checkpoint)
  shapes = reader.get_variable_to_shape_map()
  scope = VARIANTS[variant][1]
  if use_ema is None:
    use_ema = f'{scope}/stem/conv2d/kernel/ExponentialMovingAverage' in shapes
  names = official_names(model, scope)
  loaded = 0
  for layer in model.layers:
    if not layer.weights or layer.name.startswith('normalization') or layer.name == 'rescaling':
      continue
    if layer.name not in names:
      raise ValueError(f'{checkpoint}: no mapping for layer {layer.name}')
    arrays = []
    for var, name in zip(layer.weights, names[layer.name]):
      key = name + ('/ExponentialMovingAverage' if use_ema else '')
      if key not in shapes:
        raise ValueError(f'{checkpoint} lacks {key} (for {var.name})')
      arr = reader.get_tensor(key)
      if tuple(arr.shape) != tuple(var.shape):
        raise ValueError(f'{key}: shape {arr.shape} != {tuple(var.shape)} of {var.name}')
      arrays.append(arr)
    layer.set_weights(arrays)
    loaded += len(arrays)
  return loaded, use_ema


def pretrained(variant: str, checkpoint: str, input_shape=(None, None, 3)):
  model = build(variant, input_shape)
  load(model, variant, checkpoint)
  return model

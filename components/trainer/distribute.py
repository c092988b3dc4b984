"""The Trainer's tf.distribute strategy (`model.distribute`): one `run_fn` on a CPU, one GPU,
several GPUs or a TPU.

`model.batch_size` is per replica: the global batch is batch_size x replicas, and the
learning rates are multiplied by the number of replicas (the linear scaling rule), so a
recipe tuned on one device keeps its per-example step size on several.
"""
from __future__ import annotations

from typing import Tuple

import tensorflow as tf
from absl import logging

CHOICES = ('auto', 'none', 'mirrored', 'tpu')


def strategy_for(name: str) -> tf.distribute.Strategy:
  """auto: all local GPUs (mirrored) when there are several, the GPU when there is one, else
  the default (CPU); none: the default; mirrored: every local GPU, else every logical CPU
  (as in the 2-replica CPU test); tpu: the TPU this job was given."""
  if name not in CHOICES:
    raise ValueError(f'model.distribute must be one of {CHOICES}, got {name!r}')
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'none' or (name == 'auto' and not gpus):
    return tf.distribute.get_strategy()
  if name == 'auto' and len(gpus) == 1:
    return tf.distribute.OneDeviceStrategy(gpus[0].name)
  if name in ('auto', 'mirrored'):
    devices = [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))]
    return tf.distribute.MirroredStrategy(devices=devices)
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def mixed_precision_policy(strategy: tf.distribute.Strategy) -> str:
  """Mixed precision only where the hardware gains from it: bfloat16 on TPUs, float16 on GPUs
  with tensor cores (compute capability >= 7.0); float32 on CPUs (measured slower there:
  BENCHMARKS.md)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return 'mixed_bfloat16'
  for gpu in tf.config.list_physical_devices('GPU'):
    cc = tf.config.experimental.get_device_details(gpu).get('compute_capability')
    if cc and cc[0] >= 7:
      return 'mixed_float16'
  return 'float32'


def scaled(batch_size: int, learning_rate: float, replicas: int) -> Tuple[int, float]:
  """(global batch, learning rate) for `replicas` replicas of a per-replica batch."""
  return int(batch_size) * int(replicas), float(learning_rate) * int(replicas)


def set_up(name: str) -> tf.distribute.Strategy:
  """The strategy and the Keras precision policy for this run, logged."""
  import tf_keras as keras  # pylint: disable=g-import-not-at-top
  strategy = strategy_for(name)
  policy = mixed_precision_policy(strategy)
  keras.mixed_precision.set_global_policy(policy)
  logging.info('distribute=%s: %s with %d replica(s), precision %s', name,
               type(strategy).__name__, strategy.num_replicas_in_sync, policy)
  return strategy

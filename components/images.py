"""The model contract's pixels: one definition for training, export, evaluation and `predict`.

A photo reaches the model as: decoded to RGB with libjpeg's accurate integer DCT (Pillow,
or TensorFlow's `decode_jpeg(dct_method='INTEGER_ACCURATE')`: the same bytes give the same
pixels), upright by its EXIF orientation, then bilinear-resized (half-pixel centres, no
antialiasing) to size x size and rounded to uint8. Training and augmentation add random
crops, flips and colour changes on top of the same decoding.

The NumPy/Pillow half needs no TensorFlow (`carvision predict` and `evaluate` on a TFLite
file run with LiteRT, Pillow and NumPy only); the TensorFlow half is for graphs (tf.data,
the exported signatures) and imports TensorFlow when called. Ingestion stores photos
upright (`upright_jpeg`), so the graph decoder, which ignores EXIF, sees what `predict` sees.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import numpy as np

# What `predict` / `evaluate` accept (what a phone may send); the pipeline ingests JPEG.
FORMATS = ('JPEG', 'PNG', 'WEBP')
DCT_METHOD = 'INTEGER_ACCURATE'   # TF's name for libjpeg's JDCT_ISLOW, Pillow's default
EXIF_ORIENTATION = 0x0112
UPRIGHT_QUALITY = 95              # re-encoding of EXIF-rotated photos at ingestion


class PhotoError(ValueError):
  """A photo that cannot become model input; `reason` is a dead-letter style code."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason, self.detail = reason, detail


def sniff(data: bytes) -> str:
  """A short name for what the bytes start with (for error messages)."""
  head = data[:12]
  if head.startswith(b'\xff\xd8\xff'):
    return 'jpeg'
  if head.startswith(b'\x89PNG'):
    return 'png'
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
    return 'webp'
  if head.startswith(b'GIF8'):
    return 'gif'
  if data.lstrip()[:1] == b'<':
    return 'html'
  return 'unknown'


def open_rgb(data: bytes, max_pixels: int, formats: Tuple[str, ...] = FORMATS) -> np.ndarray:
  """uint8 [H, W, 3]: decoded fully, upright by EXIF orientation, in RGB whatever the mode
  (grayscale, CMYK, palette; an alpha channel is dropped). Raises PhotoError."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  if not data:
    raise PhotoError('empty', 'zero-byte body')
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format not in formats:
        raise PhotoError('unsupported_format', f'{img.format or sniff(data)} (accepted: '
                         f'{", ".join(formats)})')
      width, height = img.size
      if width * height > max_pixels:
        raise PhotoError('too_large', f'{width}x{height} > {max_pixels} pixels')
      if width == 0 or height == 0:
        raise PhotoError('empty', f'{width}x{height}')
      img.load()  # truncated or corrupt data raises here
      upright = ImageOps.exif_transpose(img)
      return np.asarray(upright.convert('RGB'), dtype=np.uint8)
  except PhotoError:
    raise
  except Image.DecompressionBombError as e:
    raise PhotoError('too_large', str(e)) from None
  except Image.UnidentifiedImageError:
    raise PhotoError('unsupported_format', f'not an image ({sniff(data)})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise PhotoError('corrupt', f'{type(e).__name__}: {e}') from None


def _weights(in_size: int, out_size: int):
  """Source rows/columns and lerp weights of TF's ResizeBilinear (half-pixel centres),
  computed in float32 as its kernel does."""
  scale = np.float32(in_size) / np.float32(out_size)
  x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(x)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(x), in_size - 1).astype(np.int64)
  return lower, upper, (x - floor).astype(np.float32)


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3] == tf.image.resize(bilinear, antialias=False), rounded, clipped."""
  h, w = rgb.shape[:2]
  y0, y1, ly = _weights(h, size)
  x0, x1, lx = _weights(w, size)
  img = rgb.astype(np.float32)
  lx = lx[None, :, None]
  top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * lx
  bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * lx
  out = top + (bottom - top) * ly[:, None, None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def contract_pixels(data: bytes, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
  """A photo file's bytes -> the model input, uint8 [size, size, 3]."""
  return resize(open_rgb(data, max_pixels), size)


def upright_jpeg(data: bytes) -> Optional[bytes]:
  """For a JPEG whose EXIF orientation is not 'normal': the upright photo re-encoded
  (quality 95), so that decoders that ignore EXIF (TensorFlow's) see it as `predict` does.
  None when the photo is upright already (its bytes are kept as they are)."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    if img.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
      return None
    upright = ImageOps.exif_transpose(img).convert('RGB')
  buf = io.BytesIO()
  upright.save(buf, 'JPEG', quality=UPRIGHT_QUALITY)
  return buf.getvalue()


def size_of(data: bytes) -> Tuple[int, int]:
  """(width, height) from the header."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    return img.size


# --- TensorFlow graphs (tf.data, exported signatures) ---------------------------------

def decode_tf(jpeg, size: int):
  """The contract in a graph: JPEG bytes -> uint8 [size, size, 3] (== contract_pixels for
  the upright JPEGs that ingestion stores)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return to_uint8(tf.image.resize(decode_full_tf(jpeg), (size, size), method='bilinear',
                                  antialias=False))


def decode_full_tf(jpeg):
  """JPEG bytes -> uint8 [H, W, 3] at the photo's own size (for augmentation)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.decode_jpeg(jpeg, channels=3, dct_method=DCT_METHOD)


def to_uint8(img):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)


def crop_to_box_tf(img, box, margin: float = 0.05):
  """Crops to a normalised [ymin, xmin, ymax, xmax] box grown by `margin` on each side."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.cast(tf.shape(img)[:2], tf.float32)
  lo = tf.clip_by_value(box[:2] - margin, 0.0, 1.0) * shape
  hi = tf.clip_by_value(box[2:] + margin, 0.0, 1.0) * shape
  lo_i = tf.cast(tf.round(lo), tf.int32)
  size_i = tf.maximum(tf.cast(tf.round(hi), tf.int32) - lo_i, 1)
  return tf.slice(img, tf.concat([lo_i, [0]], 0), tf.concat([size_i, [-1]], 0))


def augment_tf(img, size: int, box=None, crop_prob: float = 0.0, light: bool = False, seed=None):
  """A training view of decoded pixels: random resized crop (area 50-100 %), horizontal
  flip, brightness/contrast/saturation.

  With `box` (the largest car detection, when known) and `crop_prob` > 0, that share of
  views is first cropped to the car: tightly framed cars as phone users take them, while
  evaluation and serving keep the whole photo (the contract). `light`: the whole photo and
  a random flip only, as the model is served (FixRes' fine-tune at the serving size).
  `seed` (int64 [2]): every draw is a stateless function of it, so a view is the same
  whichever thread of a parallel map makes it (None: a random seed).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if seed is None:
    seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
  crop_seed, bbox_seed, flip_seed, bright_seed, contrast_seed, sat_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 6))
  if light:
    img = tf.image.resize(img, (size, size), method='bilinear')
    return to_uint8(tf.image.stateless_random_flip_left_right(img, flip_seed))
  if box is not None:
    img = tf.cond(tf.random.stateless_uniform([], crop_seed) < crop_prob,
                  lambda: crop_to_box_tf(img, box), lambda: img)
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(img), tf.zeros([1, 0, 4]), bbox_seed, min_object_covered=0.0,
      aspect_ratio_range=(0.75, 1.33), area_range=(0.5, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  img = tf.slice(img, begin, crop)
  img = tf.image.resize(img, (size, size), method='bilinear')
  img = tf.image.stateless_random_flip_left_right(img, flip_seed)
  img = tf.image.stateless_random_brightness(img, 25.0, bright_seed)
  img = tf.image.stateless_random_contrast(img, 0.8, 1.2, contrast_seed)
  img = tf.image.stateless_random_saturation(img, 0.8, 1.2, sat_seed)
  return to_uint8(img)

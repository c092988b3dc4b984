"""Files local or remote: plain Python for local paths, tf.io.gfile (imported only then) for
gs:// and other schemes, so commands that read and write local files run without TensorFlow."""
from __future__ import annotations

import glob as _glob
import os
from typing import List, Sequence


def remote(path: str) -> bool:
  return '://' in str(path)


def exists(path: str) -> bool:
  if remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


def read(path: str, mode: str = 'r'):
  if remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, mode) as f:
      return f.read()
  with open(path, mode) as f:
    return f.read()


def makedirs(path: str) -> None:
  if remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.io.gfile.makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def open_write(path: str, mode: str = 'w'):
  """A writable file object (use as a context manager)."""
  if remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path, mode)
  return open(path, mode)


def expand(patterns: Sequence[str]) -> List[str]:
  """The files of TFX file patterns (`.../Split-train/*`), directories or files, sorted: a
  list it returned expands to itself."""
  out: List[str] = []
  for p in patterns:
    if remote(p):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      glob_fn, isdir = tf.io.gfile.glob, tf.io.gfile.isdir
    else:
      glob_fn, isdir = _glob.glob, os.path.isdir
    # a directory: its files; a pattern: its matches; a file: itself if it exists
    has_wildcard = any(c in p for c in '*?[')
    out.extend(glob_fn(os.path.join(p, '*') if not has_wildcard and isdir(p) else p))
  return sorted(out)

"""The Trainer's tf.data input: photos decoded once and kept (bounded by a budget) or streamed."""
import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from carvision.components import features as F
from carvision.components import images
from carvision.components.trainer import model as M
from carvision.components.trainer import data
from carvision.components.trainer import task
from tests.helpers import TINY

FIXTURE = os.path.join(TINY, 'images')
SIZE = 96


def _spec():
  spec = {F.IMAGE: tf.io.FixedLenFeature([], tf.string),
          F.BBOX_KNOWN: tf.io.FixedLenFeature([], tf.int64)}
  spec.update({k: tf.io.FixedLenFeature([], tf.float32) for k in F.BBOX})
  spec.update({F.label_id(n): tf.io.FixedLenFeature([], tf.int64) for n in ('class', 'make')})
  return spec


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """A GZIP TFRecord of transformed examples: 12 real photos, labels 0..2, one unknown (-1)."""
  photos = sorted(glob.glob(os.path.join(FIXTURE, '*.jpg')))[:12]
  path = str(tmp_path_factory.mktemp('tfr') / 'train.gz')
  with tf.io.TFRecordWriter(path, options='GZIP') as w:
    for i, p in enumerate(photos):
      feat = {F.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[open(p, 'rb').read()])),
              F.BBOX_KNOWN: tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
              F.label_id('class'): tf.train.Feature(int64_list=tf.train.Int64List(
                  value=[-1 if i == 11 else i % 3])),
              F.label_id('make'): tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
      for k, v in zip(F.BBOX, (0.1, 0.1, 0.9, 0.9)):
        feat[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
      w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
  return [path], photos


def _all(ds):
  xs, ys = [], []
  for x, y in ds:
    xs.append(x.numpy())
    ys.append(np.argmax(y[M.CLASS_OUT].numpy(), -1))
  return np.concatenate(xs), np.concatenate(ys)


def test_kept_photos_equal_streamed_ones_at_the_serving_size(records):
  files, photos = records
  args = dict(spec=_spec(), size=SIZE, batch=5, n_classes=3, n_makes=2, training=False)
  streamed_x, streamed_y = _all(data.dataset(files, **args))
  kept = data.dataset(files, **args, decoded_size=SIZE)
  kept_x, kept_y = _all(kept)
  again_x, _ = _all(kept)  # second epoch: from the cache
  assert streamed_x.shape == (11, SIZE, SIZE, 3)  # the unknown label is not trained on
  assert streamed_x.dtype == np.uint8
  np.testing.assert_array_equal(kept_x, streamed_x)
  np.testing.assert_array_equal(again_x, streamed_x)
  np.testing.assert_array_equal(kept_y, streamed_y)
  # the model contract: the whole photo squashed to SIZE x SIZE
  np.testing.assert_array_equal(
      streamed_x[0], images.decode_tf(tf.constant(open(photos[0], "rb").read()), SIZE).numpy())


def test_training_views_at_a_lower_size_from_kept_photos(records):
  files, _ = records
  for light in (False, True):
    ds = data.dataset(files, _spec(), 64, 4, 3, 2, training=True, repeat=True,
                      crop_prob=0.5, decoded_size=SIZE, light=light)
    x1, _ = next(iter(ds))
    assert x1.shape == (4, 64, 64, 3) and x1.dtype == tf.uint8
  # light = the whole photo as served (or its mirror image): no crop, no colour change
  light = data.dataset(files, _spec(), SIZE, 11, 3, 2, training=True, decoded_size=SIZE,
                       light=True)
  served, _ = _all(data.dataset(files, _spec(), SIZE, 11, 3, 2, training=False))
  x, y = next(iter(light))
  for img in x.numpy():
    assert any(np.array_equal(img, s) or np.array_equal(img[:, ::-1], s) for s in served)


def test_a_classifier_trained_at_one_size_serves_at_another():
  """FixRes: a Lite backbone of any input size; the exported size is the served one."""
  base = M.el.build('efficientnet_lite0', (None, None, 3))
  full = M.classifier(base, M.heads(int(base.output.shape[-1]), 3, 2, 0.0), SIZE)
  assert full.input_shape == (None, None, None, 3)
  for at in (64, SIZE):
    out = full(np.zeros((2, at, at, 3), np.uint8))
    assert out[M.CLASS_OUT].shape == (2, 3)


def test_activations_over_the_budget_go_to_disk_and_train_the_same(records):
  """Bounded memory: a budget smaller than the fixture spills the frozen network's
  activations to a disk memmap; the arrays, the batches and one head fit are the same."""
  import tf_keras as keras
  files, _ = records
  lower = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(4, 3, strides=4),
                            keras.layers.GlobalAveragePooling2D()])
  ds = data.dataset(files, _spec(), SIZE, 4, 3, 2, training=False)
  in_memory, y1 = data.cached_features(lower, ds)
  store = data.ActivationStore(budget_mb=0)
  on_disk, y2 = data.cached_features(lower, ds, count=12, store=store)
  assert store.spilled == 1 and isinstance(on_disk, np.memmap)
  assert os.listdir(store.spill_dir)
  np.testing.assert_array_equal(on_disk, in_memory)
  np.testing.assert_array_equal(y1[M.CLASS_OUT], y2[M.CLASS_OUT])
  roomy = data.ActivationStore(budget_mb=1)
  kept, _ = data.cached_features(lower, ds, count=12, store=roomy)
  assert roomy.spilled == 0 and not isinstance(kept, np.memmap)
  n_out = {M.CLASS_OUT: 3, M.MAKE_OUT: 2}
  weights = []
  for x in (in_memory, on_disk):
    head = M.heads(4, 3, 2, 0.0)
    keras.utils.set_random_seed(0)
    head.set_weights([np.full(w.shape, 0.01, np.float32) for w in head.get_weights()])
    task._compile(head, 0.01, 0.0)  # pylint: disable=protected-access
    head.fit(data.ArrayBatches(x, y1, 4, n_out, shuffle=True, seed=3), epochs=2, verbose=0)
    weights.append(head.get_weights())
  for a, b in zip(*weights):
    np.testing.assert_allclose(a, b, atol=1e-6)
  store.cleanup()
  assert not os.path.exists(store.spill_dir)


def test_representative_photos_are_the_served_pixels_of_the_split_files(records):
  """The export's calibration/ranking photos: the files of a TFX pattern or directory, each
  photo decoded as served (components/images.py), in file order."""
  from carvision.components import files as files_lib
  from carvision.components import images
  from carvision.components.trainer import export
  files, photos = records
  folder = os.path.dirname(files[0])
  assert files_lib.expand([folder]) == files_lib.expand([os.path.join(folder, '*')]) == files
  rep = export.representative_pixels([folder], _spec(), SIZE, 3)
  assert rep.shape == (3, SIZE, SIZE, 3)
  np.testing.assert_array_equal(rep[0], images.contract_pixels(open(photos[0], 'rb').read(), SIZE))


def _named_records(tmp_path, order):
  """The 12 fixture photos with their p_hash, written in `order`."""
  photos = sorted(glob.glob(os.path.join(FIXTURE, '*.jpg')))[:12]
  os.makedirs(tmp_path / f'named-{order[0]}', exist_ok=True)
  path = str(tmp_path / f'named-{order[0]}' / 'data.gz')
  with tf.io.TFRecordWriter(path, options='GZIP') as w:
    for i in order:
      p = photos[i]
      feat = {F.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[open(p, 'rb').read()])),
              F.P_HASH: tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[os.path.basename(p)[:-4].encode()])),
              F.BBOX_KNOWN: tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
              F.label_id('class'): tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3])),
              F.label_id('make'): tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
      for k in F.BBOX:
        feat[k] = tf.train.Feature(float_list=tf.train.FloatList(value=[0.0]))
      w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
  return [path]


def test_training_views_and_batches_do_not_depend_on_record_order(tmp_path):
  """The same clone trains the same model: a photo's augmented view is a function of the seed,
  the view number and its p_hash (not of the thread or the record's position), cached rows are
  batched in an order fixed by their keys, and the export's calibration photos are chosen by
  hash: ExampleGen writing the records in another order changes none of them."""
  from carvision.components.trainer import export
  spec = dict(_spec(), **{F.P_HASH: tf.io.FixedLenFeature([], tf.string)})
  forward, backward = _named_records(tmp_path, list(range(12))), _named_records(tmp_path, list(range(11, -1, -1)))

  def views(files, view):
    ds = data.dataset(files, spec, 64, 5, 3, 2, training=True, view=view, keyed=True)
    out = {}
    for x, y in ds:
      out.update({int(k): img for k, img in zip(y['key'].numpy(), x.numpy())})
    return out

  a, b, again = views(forward, 1), views(backward, 1), views(forward, 1)
  assert len(a) == 12 and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a[k], again[k])
  other = views(forward, 2)  # another view of the same photos: other crops
  assert sum(not np.array_equal(a[k], other[k + 1]) for k in a) >= 10  # key: photo * 64 + view
  # cached rows stored in two orders: the same batches
  keys = np.array(sorted(a))
  rows = np.stack([a[k] for k in keys]).reshape(12, -1)[:, :8].astype(np.float16)
  y = {M.CLASS_OUT: np.arange(12) % 3, M.MAKE_OUT: np.arange(12) % 2}
  n_out = {M.CLASS_OUT: 3, M.MAKE_OUT: 2}
  perm = np.random.default_rng(1).permutation(12)
  one = data.ArrayBatches(rows, y, 5, n_out, shuffle=True, seed=3, keys=keys)
  two = data.ArrayBatches(rows[perm], {k: v[perm] for k, v in y.items()}, 5, n_out, shuffle=True,
                          seed=3, keys=keys[perm])
  for i in range(len(one)):
    np.testing.assert_array_equal(one[i][0], two[i][0])
    np.testing.assert_array_equal(one[i][1][M.CLASS_OUT], two[i][1][M.CLASS_OUT])
  # the export's calibration photos
  folders = [[os.path.dirname(f[0])] for f in (forward, backward)]
  np.testing.assert_array_equal(export.representative_pixels(folders[0], spec, 32, 4),
                                export.representative_pixels(folders[1], spec, 32, 4))


def test_photos_of_doubted_ads_are_left_out_of_every_kind_of_stage(tmp_path):
  """drop_label_issues' exclusion: end-to-end batches skip the excluded photo keys (streamed
  and kept photos alike), and cached rows of those photos are not batched."""
  spec = dict(_spec(), **{F.P_HASH: tf.io.FixedLenFeature([], tf.string)})
  files = _named_records(tmp_path, list(range(12)))
  keyed = data.dataset(files, spec, 64, 4, 3, 2, training=False, keyed=True)
  photos = sorted(int(k) // data.MAX_VIEWS for _, y in keyed for k in y['key'].numpy())
  assert len(photos) == 12
  out = np.array(photos[:3], np.int64)
  for cached in (None, 64):
    ds = data.dataset(files, spec, 64, 4, 3, 2, training=True, keyed=True, exclude=out,
                      decoded_size=cached)
    left = sorted(int(k) // data.MAX_VIEWS for _, y in ds for k in y['key'].numpy())
    assert left == photos[3:]
  keys = np.array(photos) * data.MAX_VIEWS
  rows = np.arange(12, dtype=np.float16)[:, None]
  y = {M.CLASS_OUT: np.arange(12) % 3, M.MAKE_OUT: np.arange(12) % 2}
  keep = ~np.isin(keys // data.MAX_VIEWS, out)
  batches = data.ArrayBatches(rows, y, 3, {M.CLASS_OUT: 3, M.MAKE_OUT: 2}, True, keys=keys, keep=keep)
  seen = np.concatenate([batches[i][0][:, 0] for i in range(len(batches))])
  assert len(batches) == 3 and sorted(seen.tolist()) == list(range(3, 12))


def test_relabelled_photos_train_with_their_new_class_and_make(tmp_path):
  """label_audit_relabel: end-to-end batches (streamed and kept photos alike) carry the new
  class and make of the relabelled photo keys and the listed ones of all others."""
  spec = dict(_spec(), **{F.P_HASH: tf.io.FixedLenFeature([], tf.string)})
  files = _named_records(tmp_path, list(range(12)))

  def labels(**kw):
    ds = data.dataset(files, spec, 64, 4, 3, 2, keyed=True, **kw)
    return {int(k) // data.MAX_VIEWS: (int(c), int(m)) for _, y in ds for k, c, m in zip(
        y['key'].numpy(), y[M.CLASS_OUT].numpy().argmax(-1), y[M.MAKE_OUT].numpy().argmax(-1))}

  listed = labels(training=False)
  moved = sorted(listed)[:4]
  new = {p: ((listed[p][0] + 1) % 3, 1 - listed[p][1]) for p in moved}
  relabel = (np.array(moved, np.int64), np.array([new[p][0] for p in moved], np.int64),
             np.array([new[p][1] for p in moved], np.int64))
  for cached in (None, 64):
    got = labels(training=True, decoded_size=cached, relabel=relabel)
    assert got == {p: new.get(p, listed[p]) for p in listed}

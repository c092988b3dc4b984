"""Training that tolerates seller mistakes: an out-of-fold audit of the train ads finds the
ads whose photos contradict their listing, and only those."""
import numpy as np

from carvision.components.trainer import label_noise as LN


def _ads(rng, n_classes=8, ads_per_class=12, photos=3, dim=16):
  centres = rng.normal(size=(n_classes, dim)) * 3.0
  cls = np.repeat(np.arange(n_classes), ads_per_class)
  groups = np.repeat(np.arange(len(cls)) + 1000, photos)
  truth = np.repeat(cls, photos)
  x = (centres[truth] + rng.normal(size=(len(truth), dim))).astype(np.float16)
  return x, truth, groups


def test_wrong_listings_are_flagged_and_right_ones_are_not():
  rng = np.random.default_rng(0)
  x, truth, groups = _ads(rng)
  listed = truth.copy()
  wrong = sorted(rng.choice(np.unique(groups), 6, replace=False).tolist())
  for ad in wrong:  # the seller typed another class: every photo of the ad carries it
    listed[groups == ad] = (truth[groups == ad][0] + 1 + rng.integers(7)) % 8
  probs = LN.out_of_fold(x, listed, groups, 8, folds=4, epochs=20)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-4)
  flagged = LN.flag_ads(probs, listed, groups)
  assert set(wrong) <= set(flagged) and len(flagged) <= len(wrong) + 1, (wrong, flagged)
  assert LN.flag_ads(LN.out_of_fold(x, truth, groups, 8, folds=4, epochs=20), truth, groups) == []


def test_a_share_flags_that_many_ads_the_least_likely_first():
  """label_audit_share: exactly round(share x ads) ads, the ones whose listed class gets the
  lowest mean probability over their photos, whatever cleanlab's own count would be."""
  rng = np.random.default_rng(2)
  x, truth, groups = _ads(rng)
  listed = truth.copy()
  wrong = sorted(rng.choice(np.unique(groups), 6, replace=False).tolist())
  for ad in wrong:
    listed[groups == ad] = (truth[groups == ad][0] + 1 + rng.integers(7)) % 8
  probs = LN.out_of_fold(x, listed, groups, 8, folds=4, epochs=20)
  assert LN.flag_ads(probs, listed, groups, share=6 / 96) == wrong
  more = LN.flag_ads(probs, listed, groups, share=0.25)
  assert len(more) == 24 and set(wrong) <= set(more)


def test_folds_are_whole_ads():
  """A listing repeated on the photos of one ad cannot vouch for itself: no fold both trains
  on and scores the photos of one ad (rows of a held-out ad are scored by a model that never
  saw that ad, so a unique wrong class of its own gets no probability)."""
  rng = np.random.default_rng(1)
  x, truth, groups = _ads(rng, n_classes=4, ads_per_class=6)
  listed = truth.copy()
  ad = groups[0]
  listed[groups == ad] = 4  # a class only this ad has
  probs = LN.out_of_fold(x, listed, groups, 5, folds=3, epochs=20)
  assert probs[groups == ad, 4].max() < 0.2


def test_deal_gives_each_ad_one_fold_in_equal_numbers_and_the_same_each_time():
  groups = np.repeat(np.arange(50) + 7, np.arange(50) % 4 + 1)
  fold = LN.deal(groups, 3, seed=5)
  by_ad = {g: set(fold[groups == g].tolist()) for g in np.unique(groups)}
  assert all(len(f) == 1 for f in by_ad.values())
  assert sorted(np.bincount([f.pop() for f in by_ad.values()]).tolist()) == [16, 17, 17]
  np.testing.assert_array_equal(fold, LN.deal(groups, 3, seed=5))
  assert not np.array_equal(fold, LN.deal(groups, 3, seed=6))


def test_photo_ads_reads_the_trainers_file_list_with_the_datasets_photo_keys(tmp_path):
  """The Trainer passes its expanded file list: every photo key data.dataset makes is found."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from carvision.components import features as F  # pylint: disable=g-import-not-at-top
  from carvision.components import files as files_lib  # pylint: disable=g-import-not-at-top
  split = tmp_path / 'Split-train'
  split.mkdir()
  rows = {'aa00aa00aa00aa00': 11, 'bb11bb11bb11bb11': 11, 'cc22cc22cc22cc22': 12}
  with tf.io.TFRecordWriter(str(split / 'part-0.gz'), options='GZIP') as w:
    for p_hash, ad in rows.items():
      w.write(tf.train.Example(features=tf.train.Features(feature={
          F.P_HASH: tf.train.Feature(bytes_list=tf.train.BytesList(value=[p_hash.encode()])),
          F.AD_ID: tf.train.Feature(int64_list=tf.train.Int64List(value=[ad]))})).SerializeToString())
  keys = tf.strings.to_hash_bucket_fast(list(rows), LN.PHOTO_BUCKETS).numpy().tolist()
  want = dict(zip(keys, rows.values()))
  files = files_lib.expand([str(split / '*')])
  assert files == [str(split / 'part-0.gz')] and files_lib.expand(files) == files
  assert files_lib.expand([str(split)]) == files and files_lib.expand([str(split / 'none.gz')]) == []
  for patterns in (files, [str(split / '*')], [str(split)]):
    assert LN.photo_ads(patterns) == want


def test_relabels_only_flagged_ads_with_a_confident_other_class():
  """label_audit_relabel: a flagged ad is relabelled when its photos' mean probability of one
  other class reaches the threshold; a flagged ad the audit is unsure about is not, nor is
  an ad nobody flagged, nor one whose most likely class is the listed one."""
  groups = np.array([1, 1, 2, 2, 3, 4])
  listed = np.array([0, 0, 1, 1, 2, 0])
  probs = np.array([[0.1, 0.8, 0.1], [0.1, 0.6, 0.3],    # ad 1: class 1 at 0.7 on average
                    [0.4, 0.3, 0.3], [0.3, 0.3, 0.4],    # ad 2: unsure
                    [0.9, 0.05, 0.05],                   # ad 3: sure, but not flagged
                    [0.6, 0.2, 0.2]])                    # ad 4: flagged, listed class is best
  assert LN.relabels(probs, listed, groups, [1, 2, 4], 0.5) == {1: 1}
  assert LN.relabels(probs, listed, groups, [1, 2, 4], 0.75) == {}
  assert LN.relabels(probs, listed, groups, [1, 2, 3, 4], 0.0) == {}


def test_cached_rows_of_relabelled_photos_get_the_new_class_and_make():
  """The cached stages' labels: rows (photo x view keys) of relabelled photos carry the new
  class and make, all other rows the listed ones."""
  import types  # pylint: disable=g-import-not-at-top
  from carvision.components.trainer import data as D  # pylint: disable=g-import-not-at-top
  from carvision.components.trainer import model as M  # pylint: disable=g-import-not-at-top
  from carvision.components.trainer import task  # pylint: disable=g-import-not-at-top
  photos = np.array([5, 9, 13, 40], np.int64)
  keys = np.concatenate([photos * D.MAX_VIEWS, photos * D.MAX_VIEWS + 1])  # two views each
  labels = {'key': keys, M.CLASS_OUT: np.array([0, 1, 2, 0] * 2), M.MAKE_OUT: np.array([0, 0, 1, 0] * 2)}
  run = types.SimpleNamespace(relabel=(np.array([9, 40], np.int64), np.array([2, 1]), np.array([1, 0])))
  out = task.Training._labels(run, labels)
  assert out[M.CLASS_OUT].tolist() == [0, 2, 2, 1] * 2 and out[M.MAKE_OUT].tolist() == [0, 1, 1, 0] * 2
  assert labels[M.CLASS_OUT].tolist() == [0, 1, 2, 0] * 2  # the listed labels are kept as they were
  assert task.Training._labels(types.SimpleNamespace(relabel=None), labels) is labels


def test_the_audit_line_says_what_the_run_does_with_the_flagged_ads():
  from carvision.components.trainer import task  # pylint: disable=g-import-not-at-top
  found = {'ads': [4, 7, 9], 'train_ads': 30, 'by': 'out-of-fold linear probes'}
  assert task.Training._told(found, 'trained without') == (
      'Trainer: 3 of 30 train ads have photos that contradict their label (out-of-fold linear '
      'probes): trained without them')
  assert task.Training._told({**found, 'relabelled': [[7, 2]]}, 'trained without').endswith(
      '): 1 relabelled to the class their photos show, trained without the others')


def test_at_temperature_is_softmax_of_log_probabilities_over_t():
  from carvision.components import calibration  # pylint: disable=g-import-not-at-top
  p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]], np.float32)
  for t in (0.5, 1.0, 2.0):
    np.testing.assert_allclose(calibration.at_temperature(p, t),
                               calibration.softmax(np.log(p.astype(np.float64)) / t), rtol=1e-5)
  np.testing.assert_allclose(calibration.at_temperature(p, 1.0), p, rtol=1e-5)
  assert calibration.at_temperature(p, 0.5)[0, 0] > 0.7 > calibration.at_temperature(p, 2.0)[0, 0]  # T < 1 sharpens

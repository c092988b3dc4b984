"""Training that tolerates seller mistakes: train ads whose photos contradict their listing,
found before any stage trains, by confident learning (cleanlab) on out-of-fold predictions.

The predictions come from linear classifiers on the frozen network's pooled activations
(cheap, weak) or from the network fine-tuned on the other folds (model.label_audit_folds:
the schedule's first stages once more per fold, on (K - 1) / K of the ads, so weaker than the
run's own model; in a short schedule much weaker, BENCHMARKS.md). A fold's model never saw
the ads it scores, and folds are whole ads: a wrong listing repeated on three photos of one
ad cannot vouch for itself. Per ad the photos' probabilities are averaged (an ad has one
listing), cleanlab flags the ads (its own count, or the least likely share), and every stage
then trains without their photos, or with the class they show where the audit is sure enough
(relabels). Validation is left as it is: it chooses, and the gate is on test.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import tensorflow as tf
import tf_keras as keras

from carvision.components import features as F
from carvision.components import files as files_lib

PHOTO_BUCKETS = 2**40  # the photo key of data.dataset: to_hash_bucket_fast(p_hash, 2**40)


def photo_ads(patterns: List[str]) -> Dict[int, int]:
  """{photo key: ad id} of the (GZIP TFRecord) examples in `patterns`."""
  spec = {F.AD_ID: tf.io.FixedLenFeature([1], tf.int64),
          F.P_HASH: tf.io.FixedLenFeature([1], tf.string)}
  ds = tf.data.TFRecordDataset(files_lib.expand(patterns), compression_type='GZIP').batch(1024)
  out = {}
  for batch in ds:
    f = tf.io.parse_example(batch, spec)
    keys = tf.strings.to_hash_bucket_fast(tf.reshape(f[F.P_HASH], [-1]), PHOTO_BUCKETS).numpy()
    out.update(zip((int(k) for k in keys), (int(a) for a in f[F.AD_ID].numpy().ravel())))
  return out


def deal(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """The fold (0..folds-1) of each row: groups (ads) dealt at random, in equal numbers."""
  rng = np.random.default_rng(seed)
  uniq = np.unique(groups)
  fold_of = dict(zip(rng.permutation(uniq).tolist(), np.arange(len(uniq)) % folds))
  return np.array([fold_of[g] for g in groups.tolist()], np.int64)


def out_of_fold(x: np.ndarray, classes: np.ndarray, groups: np.ndarray, n_classes: int,
                folds: int = 5, epochs: int = 30, seed: int = 7, min_steps: int = 1000) -> np.ndarray:
  """[rows, n_classes] probabilities, each row from a softmax regression fitted on the other
  folds; folds are groups (ads) dealt at random."""
  fold = deal(groups, folds, seed)
  probs = np.zeros((len(x), n_classes), np.float32)
  y = np.eye(n_classes, dtype=np.float32)[classes]
  xf = x.astype(np.float32)
  for k in range(folds):
    fit, held = fold != k, fold == k
    if not held.any() or not fit.any():
      continue
    keras.utils.set_random_seed(seed + k)
    m = keras.Sequential([keras.Input((x.shape[1],)),
                          keras.layers.Dense(n_classes, activation='softmax')])
    per_epoch = -(-int(fit.sum()) // 64)
    fold_epochs = max(epochs, -(-min_steps // per_epoch))  # small sets: enough steps to converge
    steps = fold_epochs * per_epoch
    m.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
              keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    m.fit(xf[fit], y[fit], batch_size=64, epochs=fold_epochs, verbose=0, shuffle=True)
    probs[held] = m.predict(xf[held], batch_size=1024, verbose=0)
  return probs


def ad_means(probs: np.ndarray, classes: np.ndarray, groups: np.ndarray):
  """(ad ids, [ads, classes] mean photo probabilities, listed class) of photo rows."""
  ads, index = np.unique(groups, return_inverse=True)
  mean = np.zeros((len(ads), probs.shape[1]), np.float64)
  np.add.at(mean, index, probs)
  mean /= np.bincount(index, minlength=len(ads))[:, None]
  listed = np.zeros(len(ads), np.int64)
  listed[index] = classes
  return ads, mean.astype(np.float32), listed


def flag_ads(probs: np.ndarray, classes: np.ndarray, groups: np.ndarray,
             share: float = 0.0) -> List[int]:
  """The ads (group ids) whose listed class is in doubt, from their photos' mean out-of-fold
  probabilities: with `share` 0 the ones cleanlab's `find_label_issues` flags (its own
  estimate of how many are wrong), else the `share` of all ads whose listed class gets the
  lowest mean probability (cleanlab's self-confidence label-quality score). cleanlab's count
  follows the model: a weak out-of-fold model's confident joint sees noise in hard clean ads
  too, and it flags several times the ads that are wrong (BENCHMARKS.md); a share known from
  an audit of ads the model never saw (`carvision audit`) bounds what is dropped."""
  from cleanlab.filter import find_label_issues  # pylint: disable=g-import-not-at-top
  from cleanlab.rank import get_label_quality_scores  # pylint: disable=g-import-not-at-top
  ads, mean, listed = ad_means(probs, classes, groups)
  if share > 0:
    quality = get_label_quality_scores(listed, mean, method='self_confidence')
    worst = np.argsort(quality, kind='stable')[:int(round(share * len(ads)))]
    return sorted(int(a) for a in ads[worst])
  # n_jobs=1: no worker processes forked from the Trainer's (TensorFlow, signal handlers);
  # a few thousand ads take well under a second in one process.
  issues = find_label_issues(listed, mean, filter_by='prune_by_noise_rate', n_jobs=1)
  return sorted(int(a) for a in ads[issues])


def relabels(probs: np.ndarray, classes: np.ndarray, groups: np.ndarray, flagged: List[int],
             at: float) -> Dict[int, int]:
  """{ad: class} for the flagged ads whose photos' mean probability of one other class is at
  least `at`: trained with that class instead of being left out (model.label_audit_relabel).
  With few photos a class, leaving a tenth of the ads out costs about half of what their
  wrong labels cost (BENCHMARKS.md); a confident other class keeps the photos."""
  if at <= 0 or not len(flagged):
    return {}
  ads, mean, listed = ad_means(probs, classes, groups)
  best = mean.argmax(1)
  sure = (mean[np.arange(len(ads)), best] >= at) & (best != listed) & np.isin(ads, flagged)
  return {int(a): int(c) for a, c in zip(ads[sure], best[sure])}


def class_makes(patterns: List[str], n_classes: int) -> np.ndarray:
  """[n_classes] the make id of each class id, from the (GZIP TFRecord) examples (-1: a
  class without examples there): a relabelled photo's make follows its new class."""
  cls_key, make_key = F.label_id('class'), F.label_id('make')
  spec = {cls_key: tf.io.FixedLenFeature([1], tf.int64),
          make_key: tf.io.FixedLenFeature([1], tf.int64)}
  out = np.full(n_classes, -1, np.int64)
  ds = tf.data.TFRecordDataset(files_lib.expand(patterns), compression_type='GZIP').batch(1024)
  for batch in ds:
    f = tf.io.parse_example(batch, spec)
    c, m = f[cls_key].numpy().ravel(), f[make_key].numpy().ravel()
    ok = (c >= 0) & (c < n_classes)
    out[c[ok]] = m[ok]
  return out

"""Answers an app can act on: the class, else the make, else "not sure".

Decoding is top-down, so the hierarchy holds by construction: the make is the most
probable make (the sum of its classes' calibrated probabilities), the class is the most
probable class *of that make*. A class answer therefore always has the make answer's
make, and a make fallback is never contradicted by the class it falls back from. The
thresholds are configured (`serve.*`) or chosen on the validation split for a target
precision (components/trainer), never on the split that judges the model.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from carvision.components.names import CLASS_SEP

CLASS, MAKE, NOT_SURE = 'class', 'make', 'not_sure'


def make_of(label: str) -> str:
  return label.split(CLASS_SEP, 1)[0]


def make_index(labels: Sequence[str]):
  """(makes in first-seen order, make index of each class)."""
  makes: List[str] = []
  where: Dict[str, int] = {}
  idx = []
  for label in labels:
    m = make_of(label)
    if m not in where:
      where[m] = len(makes)
      makes.append(m)
    idx.append(where[m])
  return makes, np.asarray(idx, dtype=np.int64)


def make_probabilities(probs: np.ndarray, labels: Sequence[str]):
  """(makes, [N, makes]): each make's probability = the sum over its classes."""
  makes, idx = make_index(labels)
  out = np.zeros((probs.shape[0], len(makes)), dtype=np.float64)
  np.add.at(out.T, idx, probs.T.astype(np.float64))
  return makes, out


def top_down(probs: np.ndarray, labels: Sequence[str]) -> Dict[str, np.ndarray]:
  """Per photo: the best make and its probability, the best class of that make and its
  probability (equal to the plain top class whenever that class holds >= 0.5)."""
  probs = np.asarray(probs, dtype=np.float64)
  makes, idx = make_index(labels)
  _, mp = make_probabilities(probs, labels)
  make = np.argmax(mp, axis=1)
  masked = np.where(idx[None, :] == make[:, None], probs, -1.0)
  cls = np.argmax(masked, axis=1)
  rows = np.arange(len(probs))
  return {'make': make, 'make_confidence': mp[rows, make], 'class': cls,
          'class_confidence': probs[rows, cls], 'makes': makes}


def decide(probs: np.ndarray, labels: Sequence[str], class_min: float,
           make_min: float) -> List[Dict]:
  """One decision per row of `probs`: the class when its confidence clears `class_min`,
  else the make when the make's clears `make_min`, else not sure."""
  td = top_down(probs, labels)
  out = []
  for i in range(len(probs)):
    c, m = int(td['class'][i]), int(td['make'][i])
    cc, mc = float(td['class_confidence'][i]), float(td['make_confidence'][i])
    if cc >= class_min:
      out.append({'decision': CLASS, 'answer': labels[c], 'confidence': cc,
                  'make': td['makes'][m], 'make_confidence': mc})
    elif mc >= make_min:
      out.append({'decision': MAKE, 'answer': td['makes'][m], 'confidence': mc,
                  'make': td['makes'][m], 'make_confidence': mc})
    else:
      out.append({'decision': NOT_SURE, 'answer': None, 'confidence': cc,
                  'make': td['makes'][m], 'make_confidence': mc})
  return out


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = 20) -> Dict:
  """Accuracy of the answered share against the share answered, answering the most
  confident first; `points` evenly spaced coverages from 1/points to 1."""
  confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
  n = len(confidence)
  if not n:
    return {'coverage': [], 'accuracy': [], 'threshold': []}
  order = np.argsort(-confidence, kind='stable')
  hits = np.cumsum(correct[order])
  cov, acc, thr = [], [], []
  for k in range(1, points + 1):
    m = max(1, int(round(n * k / points)))
    cov.append(round(m / n, 4))
    acc.append(round(float(hits[m - 1] / m), 4))
    thr.append(round(float(confidence[order[m - 1]]), 4))
  return {'coverage': cov, 'accuracy': acc, 'threshold': thr}


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, target: float,
                            min_answered: int = 20) -> Optional[float]:
  """The lowest confidence threshold at which the answers above it are right at least
  `target` of the time (and at least `min_answered` are answered); None when none is."""
  confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
  order = np.argsort(-confidence, kind='stable')
  conf = confidence[order]
  acc = np.cumsum(correct[order]) / np.arange(1, len(conf) + 1)
  best = None
  for m in range(min_answered, len(conf) + 1):
    # a threshold must answer every photo tied at it: only cut where the confidence drops
    if m < len(conf) and conf[m] == conf[m - 1]:
      continue
    if acc[m - 1] >= target:
      best = float(conf[m - 1])
  return best


def at_threshold(confidence: np.ndarray, correct: np.ndarray, threshold: Optional[float]) -> Dict:
  """Share answered and accuracy of the answered at a threshold (None: nothing answered)."""
  confidence, correct = np.asarray(confidence, float), np.asarray(correct, bool)
  answered = confidence >= threshold if threshold is not None else np.zeros(len(confidence), bool)
  n = int(answered.sum())
  return {'threshold': threshold, 'answered': n,
          'coverage': round(n / len(confidence), 4) if len(confidence) else None,
          'accuracy': round(float(correct[answered].mean()), 4) if n else None}


def evaluate(probs: np.ndarray, labels: Sequence[str], truth_idx: np.ndarray,
             class_min: Optional[float] = None, make_min: Optional[float] = None,
             target_precision: float = 0.95) -> Dict:
  """Risk-coverage of class and make answers, the coverage at `target_precision`, and the
  outcome of the configured decision (class / make / not sure shares and their accuracy).
  Rows with an unknown true class (truth_idx < 0) are left out."""
  keep = np.asarray(truth_idx) >= 0
  probs, truth_idx = np.asarray(probs)[keep], np.asarray(truth_idx)[keep]
  td = top_down(probs, labels)
  _, idx = make_index(labels)
  class_ok = td['class'] == truth_idx
  make_ok = td['make'] == idx[truth_idx]
  out = {'photos': int(len(probs)), 'target_precision': target_precision}
  for level, conf, ok in ((CLASS, td['class_confidence'], class_ok),
                          (MAKE, td['make_confidence'], make_ok)):
    t = threshold_for_precision(conf, ok, target_precision)
    out[level] = {'risk_coverage': risk_coverage(conf, ok),
                  'at_target_precision': at_threshold(conf, ok, t)}
  if class_min is not None and make_min is not None and len(probs):
    d = decide(probs, labels, class_min, make_min)
    kinds = np.array([x['decision'] for x in d])
    res = {}
    for kind, ok in ((CLASS, class_ok), (MAKE, make_ok)):
      sel = kinds == kind
      res[kind] = {'share': round(float(sel.mean()), 4),
                   'accuracy': round(float(ok[sel].mean()), 4) if sel.any() else None}
    res[NOT_SURE] = {'share': round(float((kinds == NOT_SURE).mean()), 4)}
    out['decision'] = {'class_min_confidence': class_min, 'make_min_confidence': make_min,
                       **res}
  return out


def choose_thresholds(probs: np.ndarray, labels: Sequence[str], truth_idx: np.ndarray,
                      target_precision: float, class_min: Optional[float] = None) -> Dict:
  """Thresholds for `decide` chosen on validation: the lowest class threshold that keeps class
  answers right `target_precision` of the time (or the given `class_min`), then the lowest make threshold that keeps the
  make answers `decide` gives (photos below the class threshold, the hard ones) right as often;
  1.0 (never) when none does. Chosen over all photos, the make threshold would be set by the
  easy photos the class answer already takes."""
  keep = np.asarray(truth_idx) >= 0
  probs, truth_idx = np.asarray(probs)[keep], np.asarray(truth_idx)[keep]
  td = top_down(probs, labels)
  _, idx = make_index(labels)
  if class_min is None:
    tc = threshold_for_precision(td['class_confidence'], td['class'] == truth_idx,
                                 target_precision)
    class_min = 1.0 if tc is None else round(tc, 6)
  left = td['class_confidence'] < class_min
  tm = threshold_for_precision(td['make_confidence'][left],
                               (td['make'] == idx[truth_idx])[left], target_precision)
  return {'class_min_confidence': class_min,
          'make_min_confidence': 1.0 if tm is None else round(tm, 6),
          'target_precision': target_precision, 'chosen_on': 'validation',
          'photos': int(len(probs)), 'photos_below_class_min': int(left.sum())}

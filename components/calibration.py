"""Calibrated confidence: temperature scaling fitted on the validation split, and the
expected calibration error (ECE) that judges it.

The fitted temperature is baked into the heads' weights (softmax((xW + b) / T) =
softmax(x (W / T) + b / T)), so every exported file, SavedModel and TFLite alike, returns
calibrated probabilities with no extra op. Plain numpy/scipy: used by the Trainer, the
gates and `carvision evaluate`.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

BINS = 15


def _bin_of(conf: np.ndarray, bins: int) -> np.ndarray:
  """The equal-width confidence bin of each top-1 confidence (0..bins-1)."""
  edges = np.linspace(0.0, 1.0, bins + 1)
  return np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
  """Expected calibration error: |accuracy - confidence| of the top-1 answer, averaged over
  `bins` equal-width confidence bins weighted by their share of photos."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if len(labels) == 0:
    return float('nan')
  conf = probs.max(axis=1)
  right = probs.argmax(axis=1) == labels
  which = _bin_of(conf, bins)
  total = 0.0
  for b in range(bins):
    sel = which == b
    if sel.any():
      total += sel.mean() * abs(right[sel].mean() - conf[sel].mean())
  return float(total)


def ece_floor(probs: np.ndarray, bins: int = BINS, draws: int = 500, seed: int = 0) -> float:
  """The mean ECE a perfectly calibrated model with these top-1 confidences scores on this
  many photos: the binned estimate is biased upward on a few hundred photos a bin, so an
  ECE near this floor cannot be told apart from perfect calibration."""
  return float(perfect_calibration_eces(probs, bins, draws, seed).mean())


def perfect_calibration_eces(probs: np.ndarray, bins: int = BINS, draws: int = 500,
                             seed: int = 0) -> np.ndarray:
  """`draws` ECEs of a model with these top-1 confidences whose answers are each right with
  probability = their confidence (binned as `ece` bins them)."""
  conf = np.asarray(probs, np.float64).max(axis=1)
  if len(conf) == 0:
    return np.full(draws, np.nan)
  rng = np.random.default_rng(seed)
  which = _bin_of(conf, bins)
  total = np.zeros(draws)
  for b in range(bins):
    c = conf[which == b]
    if not len(c):
      continue
    right = np.zeros(draws)
    for i in range(0, len(c), 4096):  # bounded memory on large evaluation sets
      right += (rng.random((draws, len(c[i:i + 4096]))) < c[i:i + 4096]).sum(axis=1)
    total += len(c) / len(conf) * np.abs(right / len(c) - c.mean())
  return total


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> Dict[str, list]:
  """Per confidence bin: photos, mean confidence, accuracy (the reliability diagram)."""
  probs = np.asarray(probs, np.float64)
  conf = probs.max(axis=1)
  right = probs.argmax(axis=1) == np.asarray(labels)
  which = _bin_of(conf, bins)
  lower = np.linspace(0.0, 1.0, bins + 1)[:-1].round(4).tolist()
  out = {'lower': lower, 'photos': [], 'confidence': [], 'accuracy': []}
  for b in range(bins):
    sel = which == b
    out['photos'].append(int(sel.sum()))
    out['confidence'].append(round(float(conf[sel].mean()), 4) if sel.any() else None)
    out['accuracy'].append(round(float(right[sel].mean()), 4) if sel.any() else None)
  return out


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def at_temperature(probs: np.ndarray, t: float) -> np.ndarray:
  """softmax(log p / T): a model's probabilities at temperature T (log-probabilities are
  logits up to a per-row constant), without a second pass through the model."""
  return softmax(np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / t)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The T in [0.05, 20] minimising the negative log-likelihood of softmax(logits / T)."""
  from scipy.optimize import minimize_scalar  # pylint: disable=g-import-not-at-top
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  rows = np.arange(len(labels))

  def nll(log_t):
    z = logits / np.exp(log_t)
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

  res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method='bounded',
                        options={'xatol': 1e-4})
  return float(np.exp(res.x))


def temperature_for(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """Fits T on a model's probabilities (log-probabilities are logits up to a per-photo
  constant, which softmax ignores); returns T and the ECE before and after."""
  logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
  t = fit_temperature(logits, labels)
  # T minimises the negative log-likelihood (never above T = 1's); the ECE usually drops
  # too, but on a few photos it can rise a little.
  return {'temperature': t, 'ece_before': ece(probs, labels),
          'ece_after': ece(softmax(logits / t), labels),
          'nll_before': _nll(logits, labels), 'nll_after': _nll(logits / t, labels),
          'photos': int(len(labels))}


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
  z = logits - logits.max(axis=1, keepdims=True)
  rows = np.arange(len(labels))
  return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, np.asarray(labels)]))

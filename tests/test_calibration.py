"""Temperature scaling fitted on validation and baked into the heads."""
import numpy as np

from carvision.components import calibration


def _overconfident(n=4000, classes=20, seed=0):
  """A calibrated model's logits (labels drawn from their own softmax) sharpened 3x: it
  claims far more confidence than it has, as fine-tuned networks do."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0, 1.5, (n, classes))
  z[np.arange(n), rng.integers(0, classes, n)] += 2.5
  p = calibration.softmax(z)
  labels = np.array([rng.choice(classes, p=row) for row in p])
  return 3.0 * z, labels


def test_temperature_fixes_an_overconfident_model():
  logits, labels = _overconfident()
  probs = calibration.softmax(logits)
  before = calibration.ece(probs, labels)
  fit = calibration.temperature_for(probs, labels)
  assert before > 0.15 and 2.5 < fit['temperature'] < 3.5
  assert fit['ece_after'] < 0.03 < before == fit['ece_before']
  assert fit['nll_after'] < fit['nll_before']
  # held-out photos from the same model: the temperature carries over
  logits2, labels2 = _overconfident(seed=1)
  assert calibration.ece(calibration.softmax(logits2 / fit['temperature']), labels2) < 0.03


def test_ece_of_a_calibrated_model_is_small_and_reliability_adds_up():
  rng = np.random.default_rng(3)
  probs = rng.dirichlet(np.ones(5) * 0.5, 20000)
  labels = np.array([rng.choice(5, p=p) for p in probs])  # drawn from its own probabilities
  assert calibration.ece(probs, labels) < 0.02
  diagram = calibration.reliability(probs, labels)
  assert sum(diagram['photos']) == 20000 and len(diagram['lower']) == calibration.BINS


def test_baked_temperature_equals_dividing_the_logits():
  import tf_keras as keras
  from carvision.components.trainer import model as M
  from carvision.components.trainer import calibrate
  head = M.heads(8, 5, 3, 0.0)
  x = np.random.default_rng(0).normal(0, 1, (4, 8)).astype(np.float32)
  dense = head.get_layer(M.CLASS_OUT)
  k, b = dense.get_weights()
  logits = x @ k + b
  calibrate.bake_temperature(head, {M.CLASS_OUT: 2.5, M.MAKE_OUT: 1.0})
  out = head(x, training=False)[M.CLASS_OUT].numpy()
  np.testing.assert_allclose(out, calibration.softmax(logits / 2.5), atol=1e-6)
  assert isinstance(head, keras.Model)


def test_scores_and_report_carry_the_reliability_diagram(tmp_path):
  from carvision.components import report, scoring
  labels = ['A|a|1', 'B|b|1', 'C|c|1']
  probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
  m = scoring.score(probs, labels, ['A|a|1', 'B|b|1', 'B|b|1', 'X|x|1'], groups=[1, 2, 2, 3])
  assert m['unknown_classes'] == 1 and sum(m['reliability']['photos']) == 3
  assert abs(m['ece'] - calibration.ece(probs[:3], np.array([0, 1, 1]))) < 1e-12
  assert 0 < m['ece_floor'] < 1
  checks = scoring.verdicts(m, {'top1_accuracy': 0.5})
  page = report.write_report(str(tmp_path), 'probe', m, checks)[0]
  assert 'Calibration: top-1 confidence vs accuracy' in open(page).read()
  assert scoring.score(probs[:0], labels, [])['reliability'] is None


def test_ece_floor_is_what_a_perfectly_calibrated_model_scores():
  """Answers drawn right with probability = confidence score about the floor; the floor
  shrinks as the photos grow and stays below a miscalibrated model's ECE."""
  rng = np.random.default_rng(5)
  probs = rng.dirichlet(np.ones(30) * 0.1, 1300)
  floor = calibration.ece_floor(probs)
  top = probs.argmax(1)
  scores = []
  for seed in range(40):
    r = np.random.default_rng(100 + seed)
    right = r.random(len(probs)) < probs.max(1)
    labels = np.where(right, top, (top + 1) % 30)
    scores.append(calibration.ece(probs, labels))
  assert 0.01 < floor < 0.05
  assert abs(np.mean(scores) - floor) < 0.004
  assert calibration.ece_floor(np.tile(probs, (10, 1))) < floor / 2.5
  sharpened = calibration.softmax(3 * np.log(probs + 1e-12))  # overconfident, same answers
  assert calibration.ece(sharpened, labels) > 3 * calibration.ece_floor(sharpened)
  assert np.isnan(calibration.ece_floor(probs[:0]))

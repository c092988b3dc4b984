"""The class / make / not-sure decision and its risk-coverage figures (numpy only)."""
import os

import numpy as np
import pytest

from carvision.components import decision as D

LABELS = ['Audi|A4|2012', 'Audi|A6|2011', 'BMW|X5|2007', 'BMW|M3|2012', 'Ford|F-150|2007']


def test_fallback_order_class_then_make_then_not_sure():
  probs = np.array([
      [0.90, 0.05, 0.02, 0.02, 0.01],   # sure of the class
      [0.40, 0.45, 0.05, 0.05, 0.05],   # not of the class, sure of the make (Audi 0.85)
      [0.30, 0.10, 0.25, 0.25, 0.10],   # neither
  ])
  d = D.decide(probs, LABELS, class_min=0.6, make_min=0.7)
  assert [x['decision'] for x in d] == [D.CLASS, D.MAKE, D.NOT_SURE]
  assert d[0]['answer'] == 'Audi|A4|2012' and d[0]['make'] == 'Audi'
  assert d[1]['answer'] == 'Audi' and d[1]['confidence'] == pytest.approx(0.85)
  assert d[2]['answer'] is None
  # the thresholds are the caller's: lower ones answer more
  assert [x['decision'] for x in D.decide(probs, LABELS, 0.25, 0.5)] == [D.CLASS] * 3
  # the third photo's best make is BMW (0.5): its class answer is the best BMW class
  assert D.decide(probs, LABELS, 0.25, 0.5)[2]['answer'] == 'BMW|X5|2007'


def test_a_make_answer_is_never_contradicted_by_the_class_it_falls_back_from():
  """The top class is Audi (0.35) but the BMW classes together hold 0.55: the answer is
  the best BMW class, and a make fallback says BMW, never Audi."""
  probs = np.array([[0.35, 0.05, 0.30, 0.25, 0.05]])
  td = D.top_down(probs, LABELS)
  assert td['makes'][td['make'][0]] == 'BMW'
  assert LABELS[td['class'][0]] == 'BMW|X5|2007'
  for class_min in (0.2, 0.5):
    d = D.decide(probs, LABELS, class_min, 0.5)[0]
    assert d['make'] == 'BMW'
    assert d['answer'] in ('BMW', 'BMW|X5|2007')
  rng = np.random.default_rng(0)
  for p in rng.dirichlet(np.ones(5) * 0.3, size=200):
    d = D.decide(p[None], LABELS, 0.4, 0.4)[0]
    if d['decision'] == D.CLASS:
      assert D.make_of(d['answer']) == d['make']


def test_threshold_for_precision_and_risk_coverage():
  conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
  ok = np.array([1, 1, 1, 1, 0, 1, 0, 0, 1, 0], bool)
  # answering the top 4 is 100 % right, top 6: 5/6 = 0.83
  assert D.threshold_for_precision(conf, ok, 1.0, min_answered=1) == 0.8
  assert D.threshold_for_precision(conf, ok, 0.8, min_answered=1) == 0.6
  assert D.threshold_for_precision(conf, ok, 1.0, min_answered=5) is None
  rc = D.risk_coverage(conf, ok, points=5)
  assert rc['coverage'] == [0.2, 0.4, 0.6, 0.8, 1.0]
  assert rc['accuracy'] == [1.0, 1.0, pytest.approx(0.8333, abs=1e-4), 0.625, 0.6]
  at = D.at_threshold(conf, ok, 0.8)
  assert at == {'threshold': 0.8, 'answered': 4, 'coverage': 0.4, 'accuracy': 1.0}


def test_ties_are_answered_together():
  conf = np.array([0.9, 0.9, 0.9, 0.5])
  ok = np.array([1, 1, 0, 1], bool)
  # no threshold can answer only the first two of three tied photos
  assert D.threshold_for_precision(conf, ok, 1.0, min_answered=1) is None


def test_evaluate_reports_the_configured_decision_and_skips_unknown_classes():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 5, 300)
  probs = rng.dirichlet(np.ones(5), size=300)
  probs[np.arange(150), truth[:150]] += 3.0  # half the photos confidently right
  probs /= probs.sum(axis=1, keepdims=True)
  truth[0] = -1
  out = D.evaluate(probs, LABELS, truth, class_min=0.6, make_min=0.6)
  assert out['photos'] == 299
  dec = out['decision']
  shares = dec['class']['share'] + dec['make']['share'] + dec['not_sure']['share']
  assert shares == pytest.approx(1.0, abs=1e-3)
  assert dec['class']['accuracy'] > 0.9
  assert out['class']['at_target_precision']['accuracy'] >= 0.95
  chosen = D.choose_thresholds(probs, LABELS, truth, 0.95)
  assert chosen['chosen_on'] == 'validation' and 0 < chosen['class_min_confidence'] <= 1


def test_scores_carry_answers_worst_makes_and_the_optional_make_gate(tmp_path):
  from carvision.components import names, report, scoring
  rng = np.random.default_rng(2)
  truth_idx = rng.integers(0, 5, 120)
  probs = rng.dirichlet(np.ones(5), size=120)
  probs[np.arange(120), truth_idx] += np.where(truth_idx < 2, 2.0, 0.2)  # Audi easy, rest hard
  probs /= probs.sum(axis=1, keepdims=True)
  truth = [LABELS[i] for i in truth_idx]
  limits = {'class_min_confidence': 0.6, 'make_min_confidence': 0.6, 'target_precision': 0.9}
  m = scoring.score(probs, LABELS, truth, groups=list(range(60)) * 2, answers=limits)
  assert m['answers']['decision']['class_min_confidence'] == 0.6
  assert m['per_ad']['answers']['photos'] == 60
  assert [w['make'] for w in m['worst_makes']][-1] == 'Audi'  # the easy make last
  assert m['worst_makes'][0]['top1_accuracy'] <= m['worst_makes'][-1]['top1_accuracy']
  # the per-make gate is off unless configured, and ignores makes with too few photos
  assert scoring.make_check(m, None, 20) is None
  worst = m['worst_makes'][0]
  failing = scoring.make_check(m, worst['top1_accuracy'] + 0.01, 1)
  assert failing['pass'] is False and worst['make'] in failing['detail']
  assert scoring.make_check(m, worst['top1_accuracy'] + 0.01, 10_000)['pass'] is True
  files = report.write_report(str(tmp_path), 'probe', m, {'min_make_top1': failing})
  assert [os.path.basename(f) for f in files] == [names.REPORT_HTML, names.REPORT_PNG,
                                                  names.RISK_COVERAGE_PNG]
  page = open(files[0]).read()
  assert 'Worst makes' in page and 'share answered at a target precision' in page


def test_thresholds_config_wins_over_the_models_own():
  from carvision.components import scoring
  from carvision.pipeline.config import ServeConfig
  saved = {'class_min_confidence': 0.7, 'make_min_confidence': 0.4, 'target_precision': 0.95}
  assert scoring.thresholds(ServeConfig(), saved)['class_min_confidence'] == 0.7
  cfg = ServeConfig(class_min_confidence=0.9)
  got = scoring.thresholds(cfg, saved)
  assert got['class_min_confidence'] == 0.9 and got['make_min_confidence'] == 0.4
  assert scoring.thresholds(ServeConfig(), None)['class_min_confidence'] is None


def test_the_make_threshold_keeps_the_make_answers_decide_gives_right():
  """The make threshold is chosen on the photos the class threshold leaves to it. 60 easy
  photos (class and make right, confident) and 40 hard ones (class wrong, make 0.6-0.9 and
  right on half): over all photos any make threshold is >= 95 % right, over the hard
  ones only none is, so make answers must not be given."""
  rng = np.random.default_rng(3)
  easy = np.tile([0.97, 0.01, 0.01, 0.005, 0.005], (60, 1))
  hard, truth_hard = [], []
  for i in range(40):
    make_p = 0.6 + 0.3 * rng.random()
    row = np.array([make_p / 2, make_p / 2, (1 - make_p) / 2, (1 - make_p) / 2, 0.0])
    hard.append(row)
    truth_hard.append(1 if i % 2 else 2)  # the class guess (Audi A4) wrong; Audi A6 or BMW
  probs = np.vstack([easy, np.array(hard)])
  truth = np.array([0] * 60 + truth_hard)
  got = D.choose_thresholds(probs, LABELS, truth, 0.95)
  assert got['photos_below_class_min'] >= 37  # at most 3 wrong class answers beside 60 right
  assert got['make_min_confidence'] == 1.0
  out = D.evaluate(probs, LABELS, truth, got['class_min_confidence'], got['make_min_confidence'])
  assert out['decision']['make']['share'] == 0.0
  # a configured class threshold is the one the make threshold is chosen under
  assert D.choose_thresholds(probs, LABELS, truth, 0.95, class_min=0.5)[
      'photos_below_class_min'] == 40
  # when the hard photos' make is right, their make answers are given
  truth[60:] = 1
  got = D.choose_thresholds(probs, LABELS, truth, 0.95)
  assert got['make_min_confidence'] < 0.9
  out = D.evaluate(probs, LABELS, truth, got['class_min_confidence'], got['make_min_confidence'])
  assert out['decision']['make']['accuracy'] == 1.0 and out['decision']['make']['share'] > 0.3

"""Running a trained carvision model the way clients do, and scoring it.

Shared by the TFLite gate (components/tflite_evaluator), the Pusher's model card and
`carvision predict` / `carvision evaluate`. The contract: the whole RGB photo,
bilinear-resized to the model's H x W, uint8 0..255; output = probabilities in
labels.txt order. Decoding/resizing uses the exact function the Trainer used.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from components import calibration
from components import decision

from components.names import CLASS_SEP, PUSHED_SAVED_MODEL
from components.names import INT8, LABELS, SERVE, TFLITE_DIR
from components.names import REPORT_HTML, REPORT_PNG, RISK_COVERAGE_PNG


def read_labels(path: str) -> List[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path) as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def pixels(jpeg: bytes, size: int) -> np.ndarray:
  """uint8 [size, size, 3] exactly as in training and serving (components/trainer/task.decode)."""
  from components.trainer import task  # pylint: disable=g-import-not-at-top
  return task.decode(jpeg, size).numpy()


class TFLiteModel:
  """An int8 (or fp16) TFLite classifier with its labels; one interpreter, batch of 1."""

  def __init__(self, path: str, labels: Optional[List[str]] = None, threads: Optional[int] = None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, 'rb') as f:
      self.content = f.read()
    self.path = path
    self.interp = Interpreter(model_content=self.content, num_threads=threads)
    self.interp.allocate_tensors()
    self.inp = self.interp.get_input_details()[0]
    outs = self.interp.get_output_details()
    self.size = int(self.inp['shape'][1])
    if labels is None:
      labels = read_labels(os.path.join(os.path.dirname(path), LABELS))
    self.labels = labels
    # output 0: classes; output 1 (files exported since both heads ship): makes
    self.out = outs[0]
    self.make_out = outs[1] if len(outs) > 1 else None
    if labels and int(self.out['shape'][-1]) != len(labels):
      raise ValueError(f'{path}: output of {int(self.out["shape"][-1])} classes, '
                       f'{len(labels)} labels')

  def predict_pixels(self, batch: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float probabilities [N, classes]."""
    out = []
    scale, zero = self.out['quantization']
    for img in batch:
      self.interp.set_tensor(self.inp['index'], img[None].astype(self.inp['dtype']))
      self.interp.invoke()
      y = self.interp.get_tensor(self.out['index'])[0]
      out.append((y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32))
    return np.stack(out)

  def predict_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
    return self.predict_pixels(np.stack([pixels(j, self.size) for j in jpegs]))


class SavedModel:
  """The float SavedModel's `serving_default`: JPEG bytes in, probabilities out."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.path = path
    self.fn = tf.saved_model.load(path).signatures['serving_default']
    for cand in (os.path.join(path, TFLITE_DIR, LABELS), os.path.join(path, '..', LABELS)):
      if tf.io.gfile.exists(cand):
        self.labels = read_labels(cand)
        break
    else:
      raise FileNotFoundError(f'no labels.txt for the SavedModel at {path}')

  def predict_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return self.fn(images=tf.constant(list(jpegs)))['probabilities'].numpy()


def load(path: str, kind: str = 'auto'):
  """A .tflite file, a pushed version dir, or a Trainer model dir.

  kind 'auto'/'tflite': the int8 TFLite (what ships) found at <path>/model.tflite or
  <path>/tflite/model.tflite; 'savedmodel': the float SavedModel (<path> or <path>/saved_model).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if path.endswith('.tflite'):
    return TFLiteModel(path)
  if kind in ('auto', 'tflite'):
    for cand in (os.path.join(path, INT8), os.path.join(path, TFLITE_DIR, INT8)):
      if tf.io.gfile.exists(cand):
        return TFLiteModel(cand)
  if kind in ('auto', 'savedmodel'):
    for cand in (path, os.path.join(path, PUSHED_SAVED_MODEL)):
      if tf.io.gfile.exists(os.path.join(cand, 'saved_model.pb')):
        return SavedModel(cand)
  raise FileNotFoundError(f'no {kind} model at {path}')


def make_of(label: str) -> str:
  return label.split(CLASS_SEP, 1)[0]


def read_serve(model_dir: str) -> Optional[Dict]:
  """The decision thresholds saved with a model (serve.json), or None for older models."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for cand in (os.path.join(model_dir, SERVE), os.path.join(model_dir, TFLITE_DIR, SERVE)):
    if tf.io.gfile.exists(cand):
      with tf.io.gfile.GFile(cand) as f:
        return json.load(f)
  return None


def thresholds(serve_cfg, saved: Optional[Dict]) -> Dict:
  """class_min_confidence / make_min_confidence / target_precision: a number in the config
  wins, else the model's own (chosen on validation), else None (no decision)."""
  saved = saved or {}
  out = {}
  for key in ('class_min_confidence', 'make_min_confidence'):
    v = getattr(serve_cfg, key, None) if serve_cfg is not None else None
    out[key] = v if v is not None else saved.get(key)
  out['target_precision'] = (getattr(serve_cfg, 'target_precision', None)
                             or saved.get('target_precision') or 0.95)
  return out


def score(probs: np.ndarray, labels: List[str], truth: Sequence[str],
          groups: Optional[Sequence] = None, top_confusions: int = 10,
          answers: Optional[Dict] = None, worst: int = 10) -> Dict:
  """top-1/top-5, make-level accuracy, per-make top-1, worst makes, confused pairs,
  risk-coverage of class and make answers (and the decision at `answers`' thresholds);
  per group (ad) too.

  A true class the model has no output for counts as wrong (it cannot be predicted).
  """
  index = {l: i for i, l in enumerate(labels)}
  order = np.argsort(-probs, axis=1)
  pred = order[:, 0]
  y = np.array([index.get(t, -1) for t in truth])
  top1 = pred == y
  top5 = np.array([y[i] in order[i, :5] for i in range(len(y))])
  make_ok = np.array([make_of(labels[p]) == make_of(t) for p, t in zip(pred, truth)])
  per_make = collections.defaultdict(lambda: [0, 0])
  confusions = collections.Counter()
  for p, t, ok in zip(pred, truth, top1):
    per_make[make_of(t)][0] += int(ok)
    per_make[make_of(t)][1] += 1
    if not ok:
      confusions[(t, labels[p])] += 1
  out = {'examples': int(len(y)), 'top1_accuracy': float(top1.mean()) if len(y) else None,
         'top5_accuracy': float(top5.mean()) if len(y) else None,
         'make_accuracy': float(make_ok.mean()) if len(y) else None,
         'unknown_classes': int((y < 0).sum()),
         # calibration of the top-1 probability (15 bins), photos of known classes
         'ece': calibration.ece(probs[y >= 0], y[y >= 0]) if (y >= 0).any() else None,
         # the reliability diagram behind it: per confidence bin, photos / confidence / accuracy
         'reliability': (calibration.reliability(probs[y >= 0], y[y >= 0])
                         if (y >= 0).any() else None),
         'per_make': {m: {'top1_accuracy': c / n, 'examples': n}
                      for m, (c, n) in sorted(per_make.items())},
         'worst_makes': [{'make': m, 'top1_accuracy': round(c / n, 4), 'examples': n}
                         for m, (c, n) in sorted(per_make.items(),
                                                 key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1]))
                         ][:worst],
         # accuracy of the answered share against the share answered (class, make)
         'answers': _answers(probs, labels, y, answers),
         'confused_pairs': [{'true': t, 'predicted': p, 'count': n}
                            for (t, p), n in confusions.most_common(top_confusions)]}
  if groups is not None:
    by = collections.defaultdict(list)
    for i, g in enumerate(groups):
      by[g].append(i)
    keys = sorted(by)
    agg = np.stack([probs[by[g]].mean(axis=0) for g in keys])
    ad_truth = [truth[by[g][0]] for g in keys]
    ad = score(agg, labels, ad_truth, None, 0, answers=answers)
    out['per_ad'] = {k: ad[k] for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                        'make_accuracy', 'answers')}
  return out


def _answers(probs, labels, y, answers: Optional[Dict]) -> Optional[Dict]:
  if not len(y) or not (y >= 0).any():
    return None
  answers = answers or {}
  return decision.evaluate(probs, labels, y, answers.get('class_min_confidence'),
                           answers.get('make_min_confidence'),
                           answers.get('target_precision') or 0.95)


def make_check(metrics: Dict, min_top1: Optional[float], min_photos: int) -> Optional[Dict]:
  """The optional per-make gate: every make with >= min_photos photos reaches min_top1."""
  if min_top1 is None:
    return None
  eligible = {m: v for m, v in metrics.get('per_make', {}).items() if v['examples'] >= min_photos}
  if not eligible:
    return {'value': None, 'threshold': min_top1, 'pass': True,
            'detail': f'no make has {min_photos} photos'}
  worst = min(eligible, key=lambda m: eligible[m]['top1_accuracy'])
  v = eligible[worst]
  below = sorted(m for m, x in eligible.items() if x['top1_accuracy'] < min_top1 - 1e-9)
  return {'value': v['top1_accuracy'], 'threshold': min_top1, 'pass': not below,
          'detail': (f"worst make {worst} ({v['examples']} photos); below: {', '.join(below[:10])}"
                     if below else f"worst make {worst} ({v['examples']} photos)")}


def verdicts(metrics: Dict, gates: Dict[str, float]) -> Dict[str, Dict]:
  """{metric: {value, threshold, pass}} for floors like {'top1_accuracy': 0.8}."""
  out = {}
  for name, floor in gates.items():
    v = metrics.get(name)
    out[name] = {'value': v, 'threshold': floor, 'pass': v is not None and v >= floor - 1e-9}
  return out


def write_report(out_dir: str, title: str, metrics: Dict, checks: Dict[str, Dict]) -> List[str]:
  """report.html + report.png: verdict per check, per-make accuracy, most confused pairs."""
  import html  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(out_dir)
  makes = metrics.get('per_make', {})
  names = sorted(makes, key=lambda m: makes[m]['top1_accuracy'])
  fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(names) + 1)))
  ax.barh(names, [makes[m]['top1_accuracy'] for m in names], color='#4c72b0')
  for gate in ('top1_accuracy',):
    if gate in checks:
      ax.axvline(checks[gate]['threshold'], color='#c44e52', linestyle='--', label='top-1 gate')
  ax.set_xlim(0, 1)
  ax.set_xlabel('top-1 accuracy (photos of the make)')
  ax.set_title(title)
  ax.tick_params(axis='y', labelsize=7)
  fig.tight_layout()
  png = os.path.join(out_dir, REPORT_PNG)
  with tf.io.gfile.GFile(png, 'wb') as f:
    fig.savefig(f, format='png', dpi=90)
  plt.close(fig)
  files = [png]
  ans = metrics.get('answers') or {}
  if ans:
    fig, ax = plt.subplots(figsize=(6, 4))
    for level, style in ((decision.CLASS, '-'), (decision.MAKE, '--')):
      rc = (ans.get(level) or {}).get('risk_coverage') or {}
      ax.plot(rc.get('coverage', []), rc.get('accuracy', []), style, marker='.',
              label=f'{level}, photos')
      ad_rc = (((metrics.get('per_ad') or {}).get('answers') or {}).get(level) or {}).get(
          'risk_coverage') or {}
      ax.plot(ad_rc.get('coverage', []), ad_rc.get('accuracy', []), style, alpha=0.5,
              label=f'{level}, ads')
    ax.set_xlabel('share answered (most confident first)')
    ax.set_ylabel('accuracy of the answered')
    ax.set_xlim(0, 1.02)
    ax.set_title('Risk-coverage')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rc_png = os.path.join(out_dir, RISK_COVERAGE_PNG)
    with tf.io.gfile.GFile(rc_png, 'wb') as f:
      fig.savefig(f, format='png', dpi=90)
    plt.close(fig)
    files.append(rc_png)
  rows = ''.join(
      f"<tr><td>{html.escape(k)}</td><td>{'n/a' if c.get('value') is None else round(c['value'], 4)}"
      f"</td><td>{html.escape(str(c.get('threshold', '')))}</td>"
      f"<td style='color:{'green' if c['pass'] else 'red'}'>{'PASS' if c['pass'] else 'FAIL'}"
      f"</td><td>{html.escape(c.get('detail', ''))}</td></tr>" for k, c in checks.items())
  conf = ''.join(f"<tr><td>{html.escape(p['true'])}</td><td>{html.escape(p['predicted'])}</td>"
                 f"<td>{p['count']}</td></tr>" for p in metrics.get('confused_pairs', []))
  rel = metrics.get('reliability') or {}
  bins = ''.join(f"<tr><td>{lo:.2f}</td><td>{n}</td><td>{'' if c is None else c}</td>"
                 f"<td>{'' if a is None else a}</td></tr>"
                 for lo, n, c, a in zip(rel.get('lower', []), rel.get('photos', []),
                                        rel.get('confidence', []), rel.get('accuracy', [])) if n)
  worst = ''.join(f"<tr><td>{html.escape(w['make'])}</td><td>{w['top1_accuracy']}</td>"
                  f"<td>{w['examples']}</td></tr>" for w in metrics.get('worst_makes', []))
  answer_rows = ''
  for level in (decision.CLASS, decision.MAKE):
    at = (ans.get(level) or {}).get('at_target_precision') or {}
    if at:
      answer_rows += (f"<tr><td>{level}</td><td>{ans.get('target_precision')}</td>"
                      f"<td>{at.get('threshold')}</td><td>{at.get('coverage')}</td>"
                      f"<td>{at.get('accuracy')}</td></tr>")
  dec = ans.get('decision') or {}
  decided = ('' if not dec else
             f"<p>Configured decision (class &ge; {dec['class_min_confidence']}, else make &ge; "
             f"{dec['make_min_confidence']}, else not sure): class {dec['class']['share']} of "
             f"photos (accuracy {dec['class']['accuracy']}), make {dec['make']['share']} "
             f"(accuracy {dec['make']['accuracy']}), not sure {dec['not_sure']['share']}.</p>")
  verdict = all(c['pass'] for c in checks.values())
  doc = (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
         f"<h1>{html.escape(title)}</h1><h2>Verdict: {'BLESSED' if verdict else 'NOT BLESSED'}</h2>"
         f"<table border=1 cellpadding=4><tr><th>check</th><th>value</th><th>threshold</th>"
         f"<th>result</th><th>detail</th></tr>{rows}</table>"
         f"<h2>Most confused class pairs</h2><table border=1 cellpadding=4><tr><th>true</th>"
         f"<th>predicted</th><th>photos</th></tr>{conf}</table>"
         f"<h2>Calibration: top-1 confidence vs accuracy (ECE {metrics.get('ece')})</h2>"
         f"<table border=1 cellpadding=4><tr><th>confidence from</th><th>photos</th>"
         f"<th>mean confidence</th><th>accuracy</th></tr>{bins}</table>"
         f"<h2>Answers: share answered at a target precision</h2>{decided}"
         f"<table border=1 cellpadding=4><tr><th>answer</th><th>target precision</th>"
         f"<th>threshold</th><th>share answered</th><th>accuracy</th></tr>{answer_rows}</table>"
         + (f"<img src='{RISK_COVERAGE_PNG}'>" if len(files) > 1 else '') +
         f"<h2>Worst makes</h2><table border=1 cellpadding=4><tr><th>make</th><th>top-1</th>"
         f"<th>photos</th></tr>{worst}</table>"
         f"<h2>Per-make accuracy</h2><img src='{REPORT_PNG}'>"
         f"<h2>All figures</h2><pre>{html.escape(json.dumps(metrics, indent=1))}</pre>"
         f"</body></html>")
  page = os.path.join(out_dir, REPORT_HTML)
  with tf.io.gfile.GFile(page, 'w') as f:
    f.write(doc)
  return [page] + files

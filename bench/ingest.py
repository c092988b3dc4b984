"""Photos/s through fetch-and-validate from a loopback host adding 20 ms per request,
against a serial downloader (one request after another, like the original script).

  scripts/env.sh run 'python bench/ingest.py [--photos 1200] [--latency-ms 20]'
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

from components.example_gen import beam_ingest, records  # noqa: E402
from pipeline import config as config_lib, services  # noqa: E402

TINY = os.path.join(config_lib.REPO_ROOT, 'tests', 'data', 'car_ads_tiny')


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--photos', type=int, default=1200)
  ap.add_argument('--latency-ms', type=float, default=20)
  ap.add_argument('--serial-photos', type=int, default=150)
  ap.add_argument('--out', default='/tmp/carvision/bench_ingest')
  args = ap.parse_args()
  images = sorted(f[:-4] for f in os.listdir(os.path.join(TINY, 'images')))
  host = services.ImageHost(os.path.join(TINY, 'images'), latency_s=args.latency_ms / 1000)
  # Distinct rows pointing at real files: the p_hash differs (no de-dup), the file repeats.
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, 'cars.csv')
  alias = {}
  with open(csv_path, 'w') as f:
    f.write('ad_id,make,model,submodel,hashish\n')
    for i in range(args.photos):
      fake = f'{i:016x}'
      alias[fake] = images[i % len(images)]
      f.write(f'{1000000 + i},Make,Model,Sub,{fake}\n')
  blobs = {}
  for name in images:
    with open(os.path.join(TINY, 'images', name + '.jpg'), 'rb') as f:
      blobs[name] = f.read()
  for fake, real in alias.items():
    host.faults[fake] = lambda k, body=blobs[real]: (200, body)

  # Serial: one request after another with a plain session, then the same validation.
  t = time.time()
  s = requests.Session()
  for fake in list(alias)[:args.serial_photos]:
    data = s.get(host.url_template.format(p_hash=fake), timeout=20).content
    records.validate_image(data, 40_000_000)
  serial = args.serial_photos / (time.time() - t)

  cfg = config_lib.load('default')
  ingest = dataclasses.asdict(cfg.ingest)
  ingest.update(csv=csv_path, dsn=None, image_url_template=host.url_template,
                max_dead_letter_share=1.0)
  t = time.time()
  with beam.Pipeline() as p:
    beam_ingest.build(p, ingest, os.path.join(args.out, 'examples'), args.out)
  wall = time.time() - t
  summary = beam_ingest.read_summary(args.out)
  host.stop()
  n = sum(summary['examples'].values())
  result = {'photos': args.photos, 'examples': n, 'dead_letters': summary['dead_letters'],
            'latency_ms': args.latency_ms, 'concurrency': ingest['http']['concurrency'],
            'serial_photos_per_s': round(serial, 1),
            'pipeline_photos_per_s': round(args.photos / wall, 1),
            'speedup': round(args.photos / wall / serial, 1), 'pipeline_wall_s': round(wall, 1),
            'cpus': os.cpu_count(), 'machine': platform.machine()}
  print(json.dumps(result))


if __name__ == '__main__':
  main()

"""The carvision CLI as a user runs it: a subprocess against real PostgreSQL and HTTP."""
import csv
import json
import os
import subprocess
import sys

from tests.conftest import REPO, TINY


def _cli(*args, env=None):
  res = subprocess.run([sys.executable, '-m', 'pipeline.cli', *args], cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, **(env or {})}, timeout=600)
  return res


def test_export_matches_original_query_without_duplicates(tmp_path, tiny_dsn):
  out = tmp_path / 'cars.csv'
  res = _cli('export', '--dsn', tiny_dsn, '--out', str(out))
  assert res.returncode == 0, res.stderr[-2000:]
  with open(out) as f:
    mine = {int(r['ad_id']): r for r in csv.DictReader(f)}
  with open(os.path.join(TINY, 'cars.csv')) as f:
    original = {int(r['ad_id']): r for r in csv.DictReader(f)}
  assert set(mine) == set(original)
  for ad, row in original.items():
    hashes = mine[ad]['hashish'].split(',')
    assert len(hashes) == len(set(hashes))  # the duplicate-p_hash defect is gone
    assert set(hashes) == set(row['hashish'].split(','))
    assert [mine[ad][k] for k in ('make', 'model', 'submodel')] == \
        [row[k] for k in ('make', 'model', 'submodel')]


def test_ingest_prints_accounting_json(tmp_path, tiny_dsn, image_host, tiny_labels):
  res = _cli('ingest', '--dsn', tiny_dsn, '--image-url-template', image_host.url_template,
             '--out', str(tmp_path / 'out'))
  assert res.returncode == 0, res.stderr[-2000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary['rows'] == len(tiny_labels)
  assert summary['rows'] == sum(summary['examples'].values()) + sum(summary['dead_letters'].values())


def test_ingest_from_csv_export(tmp_path, image_host, tiny_manifest):
  res = _cli('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--image-url-template',
             image_host.url_template, '--out', str(tmp_path / 'out'))
  assert res.returncode == 0, res.stderr[-2000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary['rows'] == tiny_manifest['counts']['cars_csv_hashes']
  assert summary['dead_letters']['duplicate'] == \
      tiny_manifest['noise_counts']['e_two_vehicle_detection_images']


def test_export_per_image_has_bbox_and_confidence(tmp_path, tiny_dsn):
  out = tmp_path / 'photos.csv'
  res = _cli('export', '--dsn', tiny_dsn, '--out', str(out), '--per-image')
  assert res.returncode == 0, res.stderr[-2000:]
  rows = list(csv.DictReader(open(out)))
  with open(os.path.join(TINY, 'cars.csv')) as f:
    original = {(int(r['ad_id']), h) for r in csv.DictReader(f) for h in r['hashish'].split(',')}
  # the same (ad, photo) pairs as the original query, each once
  assert {(int(r['ad_id']), r['p_hash']) for r in rows} == original
  assert len(rows) == len(original)
  for r in rows:
    x1, y1, x2, y2 = (float(r[k]) for k in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2'))
    assert x1 < x2 and y1 < y2 and 0.0 < float(r['confidence']) <= 1.0

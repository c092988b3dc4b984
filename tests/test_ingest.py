"""Ingestion with real parts: PostgreSQL, an HTTP photo host on loopback, Beam."""
import io
import os

import pytest
from PIL import Image

from components.example_gen import beam_ingest, records
from tests.conftest import TINY
from tests.ingest_helpers import expected_from_labels, run_ingest


def test_database_rows_all_accounted(tmp_path, tiny_dsn, image_host, tiny_labels, tiny_manifest):
  summary, dead, examples = run_ingest(tmp_path, dsn=tiny_dsn,
                                       image_url_template=image_host.url_template)
  n_examples, reasons = expected_from_labels(tiny_labels, tiny_manifest)
  assert summary['rows'] == len(tiny_labels) == 203
  assert sum(summary['examples'].values()) == n_examples
  assert summary['dead_letters'] == reasons
  assert len(dead) == sum(reasons.values())
  assert all(d['reason'] and d['p_hash'] is not None for d in dead)
  # No ad crosses splits; no photo is written twice.
  ads = {s: {ex.features.feature['ad_id'].int64_list.value[0] for ex in exs}
         for s, exs in examples.items()}
  assert not ads['train'] & ads['eval']
  hashes = [ex.features.feature['p_hash'].bytes_list.value[0]
            for exs in examples.values() for ex in exs]
  assert len(hashes) == len(set(hashes)) == n_examples


def test_example_carries_original_bytes_and_labels(tmp_path, tiny_dsn, image_host):
  _, _, examples = run_ingest(tmp_path, dsn=tiny_dsn, image_url_template=image_host.url_template)
  ex = examples['train'][0]
  f = ex.features.feature
  p_hash = f['p_hash'].bytes_list.value[0].decode()
  with open(os.path.join(TINY, 'images', p_hash + '.jpg'), 'rb') as fh:
    assert f['image/encoded'].bytes_list.value[0] == fh.read()  # never re-encoded
  label = f['label/class'].bytes_list.value[0].decode()
  assert label.split('|') == [f[k].bytes_list.value[0].decode()
                              for k in ('label/make', 'label/model', 'label/submodel')]
  w, h = Image.open(io.BytesIO(f['image/encoded'].bytes_list.value[0])).size
  assert (f['image/width'].int64_list.value[0], f['image/height'].int64_list.value[0]) == (w, h)
  assert 0.0 <= f['image/object/bbox/xmin'].float_list.value[0] < \
      f['image/object/bbox/xmax'].float_list.value[0] <= 1.0


def _csv(tmp_path, hashes, ad_id=1234567, label=('BMW', 'X6', 'SUV 2012')):
  path = tmp_path / 'cars.csv'
  lines = ['ad_id,make,model,submodel,hashish']
  for i, h in enumerate(hashes):
    lines.append(f'{ad_id + i},{label[0]},{label[1]},{label[2]},"{h}"')
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


GOOD = sorted(f[:-4] for f in os.listdir(os.path.join(TINY, 'images')))


def _jpeg(size=(64, 48)):
  buf = io.BytesIO()
  Image.new('RGB', size, (200, 10, 10)).save(buf, 'JPEG')
  return buf.getvalue()


@pytest.mark.parametrize('fault,reason', [
    (lambda k: (404, b'not here'), records.HTTP_404),
    (lambda k: (503, b'busy'), records.HTTP_5XX),
    (lambda k: (200, _jpeg()[:len(_jpeg()) // 2]), records.CORRUPT_JPEG),
    (lambda k: (200, os.urandom(3000)), records.NOT_JPEG),
    (lambda k: (200, b'<html><body>502 Bad Gateway</body></html>'), records.NOT_JPEG),
    (lambda k: (200, b''), records.EMPTY),
])
def test_bad_photo_becomes_dead_letter(tmp_path, image_host, fault, reason):
  target = GOOD[0]
  image_host.faults[target] = fault
  summary, dead, _ = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [target, GOOD[1]]),
                                image_url_template=image_host.url_template,
                                max_dead_letter_share=1.0, http={'backoff_factor': 0.01})
  assert summary['rows'] == 2
  assert summary['dead_letters'] == {reason: 1}
  assert sum(summary['examples'].values()) == 1
  assert dead[0]['p_hash'] == target and dead[0]['reason'] == reason


def test_png_is_not_jpeg(tmp_path, image_host):
  buf = io.BytesIO()
  Image.new('RGB', (32, 32)).save(buf, 'PNG')
  image_host.faults[GOOD[0]] = lambda k: (200, buf.getvalue())
  summary, dead, _ = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0]]),
                                image_url_template=image_host.url_template,
                                max_dead_letter_share=1.0)
  assert summary['dead_letters'] == {records.NOT_JPEG: 1}
  assert '(png)' in dead[0]['detail']


def test_5xx_then_ok_is_retried(tmp_path, image_host):
  calls = []

  def flaky(key):
    calls.append(key)
    return (500, b'oops') if len(calls) < 3 else None

  image_host.faults[GOOD[0]] = flaky
  summary, _, examples = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0]]),
                                    image_url_template=image_host.url_template,
                                    http={'backoff_factor': 0.01})
  assert summary == {'rows': 1, 'examples': {**{s: 0 for s in examples},
                                             **{s: len(e) for s, e in examples.items()}},
                     'dead_letters': {}}
  assert sum(len(e) for e in examples.values()) == 1
  assert len(calls) == 3


def test_404_is_not_retried(tmp_path, image_host):
  image_host.faults[GOOD[0]] = lambda k: (404, b'')
  run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0]]),
             image_url_template=image_host.url_template, max_dead_letter_share=1.0)
  assert image_host.hits[GOOD[0]] == 1


def test_persistent_timeout(tmp_path, image_host):
  image_host.faults[GOOD[0]] = lambda k: (None, 2.0)  # hang longer than the read timeout
  summary, _, _ = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0]]),
                             image_url_template=image_host.url_template,
                             max_dead_letter_share=1.0,
                             http={'read_timeout_s': 0.3, 'retries': 1, 'backoff_factor': 0.01})
  assert summary['dead_letters'] == {records.TIMEOUT: 1}


def test_duplicate_p_hash_kept_once_and_bad_hash_never_fetched(tmp_path, image_host):
  csv_path = _csv(tmp_path, [f'{GOOD[0]},{GOOD[0]}', '../../etc/passwd'])
  summary, dead, _ = run_ingest(tmp_path / 'out', csv=csv_path,
                                image_url_template=image_host.url_template,
                                max_dead_letter_share=1.0)
  assert summary['rows'] == 3
  assert summary['dead_letters'] == {records.DUPLICATE: 1, records.BAD_P_HASH: 1}
  assert image_host.hits == {GOOD[0]: 1}


def test_dead_letter_share_limit_fails_loudly(tmp_path, image_host):
  for h in GOOD[:3]:
    image_host.faults[h] = lambda k: (404, b'')
  summary, _, _ = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, GOOD[:4]),
                             image_url_template=image_host.url_template)
  assert summary['dead_letters'] == {records.HTTP_404: 3}
  with pytest.raises(RuntimeError, match='max_dead_letter_share'):
    beam_ingest.check_share(summary, 0.10)


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(TINY), '..', '..', '..',
                                                   'shared', 'data', 'car_ads')),
                    reason='../shared/data/car_ads is not present (only in the dev checkout)')
def test_full_dataset_reconciles_with_manifest(tmp_path, postgres):
  import csv
  import json
  from pipeline import services
  from tests.conftest import SHARED_FULL
  dsn = postgres.create_db('car_ads_full', os.path.join(SHARED_FULL, 'seez.sql'))
  host = services.ImageHost(os.path.join(SHARED_FULL, 'images'))
  try:
    summary, _, _ = run_ingest(tmp_path, dsn=dsn, image_url_template=host.url_template)
  finally:
    host.stop()
  with open(os.path.join(SHARED_FULL, 'labels.csv')) as f:
    labels = list(csv.DictReader(f))
  with open(os.path.join(SHARED_FULL, 'manifest.json')) as f:
    manifest = json.load(f)
  n_examples, reasons = expected_from_labels(labels, manifest, os.path.join(SHARED_FULL, 'images'))
  assert summary['rows'] == len(labels) == manifest['counts']['ad_images_rows']
  assert sum(summary['examples'].values()) == n_examples
  assert summary['dead_letters'] == reasons


def test_too_large_by_pixels_and_by_bytes(tmp_path, image_host):
  # A real 8000x6000 JPEG (48 Mpx, over the 40 Mpx default): refused from its header.
  buf = io.BytesIO()
  Image.new('RGB', (8000, 6000), (90, 90, 90)).save(buf, 'JPEG', quality=50)
  big = buf.getvalue()
  image_host.faults[GOOD[0]] = lambda k: (200, big)
  summary, dead, _ = run_ingest(tmp_path / 'a', csv=_csv(tmp_path, [GOOD[0], GOOD[1]]),
                                image_url_template=image_host.url_template,
                                max_dead_letter_share=1.0)
  assert summary['dead_letters'] == {records.TOO_LARGE: 1}
  assert '8000x6000' in dead[0]['detail']
  # A body over http.max_bytes is cut off while streaming.
  summary, dead, _ = run_ingest(tmp_path / 'b', csv=_csv(tmp_path, [GOOD[1]]),
                                image_url_template=image_host.url_template,
                                max_dead_letter_share=1.0, http={'max_bytes': 1000})
  assert summary['dead_letters'] == {records.TOO_LARGE: 1}
  assert 'bytes' in dead[0]['detail']


def test_local_paths_through_beam_filesystems(tmp_path):
  """The same code path serves gs:// templates (Beam FileSystems); here a local directory."""
  template = os.path.join(TINY, 'images', '{p_hash}.jpg')
  missing = 'f' * 16
  summary, dead, examples = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0], missing]),
                                       image_url_template=template, max_dead_letter_share=1.0)
  assert sum(len(e) for e in examples.values()) == 1
  assert summary['dead_letters'] == {records.MISSING_FILE: 1}
  assert dead[0]['p_hash'] == missing


def _edit_db(postgres, name, sql_statements):
  import psycopg2
  dsn = postgres.create_db(name, os.path.join(TINY, 'seez.sql'))
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    for stmt, params in sql_statements:
      cur.execute(stmt, params)
  return dsn


def _pick_ads(tiny_labels, tiny_manifest, n):
  """Clean ads (every photo a decodable car photo) from the sample's ground truth."""
  noise = tiny_manifest['noise_ids']
  bad = set(noise['b_missing_file_rows']) | set(noise['c_corrupt_files'])
  bad_ads = {int(a) for a in noise['d_unlinked_model_submodel_ads'] + noise['d_null_submodel_ads']}
  by_ad = {}
  for r in tiny_labels:
    by_ad.setdefault(int(r['ad_id']), []).append(r)
  clean = [a for a, rows in sorted(by_ad.items()) if a not in bad_ads and
           all(r['is_car'] == 'true' and r['p_hash'] not in bad for r in rows)]
  return [(a, [r['p_hash'] for r in by_ad[a]]) for a in clean[:n]]


def test_null_submodel_pair_not_in_catalog_and_non_car_rows(tmp_path, postgres, image_host,
                                                           tiny_labels, tiny_manifest):
  """Each database defect on its own: only three ads left, one defect each."""
  (a1, p1), (a2, p2), (a3, p3) = _pick_ads(tiny_labels, tiny_manifest, 3)
  keep = [a1, a2, a3]
  dsn = _edit_db(postgres, 'defects', [
      ('DELETE FROM app.ad_images WHERE NOT (ad_id = ANY(%s))', (keep,)),
      ('DELETE FROM app.ads WHERE NOT (id = ANY(%s))', (keep,)),
      ('UPDATE app.ads SET submodel_id = NULL WHERE id = %s', (a1,)),
      # a submodel that exists but is not paired with this ad's model
      ('UPDATE app.ads a SET submodel_id = (SELECT s.id FROM static.submodels s WHERE NOT EXISTS '
       '(SELECT 1 FROM static.models_submodels ms WHERE ms.model_id = a.model_id AND '
       'ms.submodel_id = s.id) ORDER BY s.id LIMIT 1) WHERE a.id = %s', (a2,)),
      ("UPDATE app.ad_images SET yolo_classification = "
       "'[{\"class_name\": \"person\", \"confidence\": 0.9, \"bbox\": [0, 0, 10, 10]}]'::jsonb "
       "WHERE ad_id = %s AND p_hash = %s", (a3, p3[0])),
  ])
  summary, dead, examples = run_ingest(tmp_path, dsn=dsn, image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  assert summary['rows'] == len(p1) + len(p2) + len(p3)
  assert summary['dead_letters'] == {records.MISSING_LABEL: len(p1),
                                     records.PAIR_NOT_IN_CATALOG: len(p2), records.NON_CAR: 1}
  assert sum(len(e) for e in examples.values()) == len(p3) - 1
  by_reason = {d['reason']: d for d in dead}
  assert 'NULL' in by_reason[records.MISSING_LABEL]['detail']
  assert by_reason[records.NON_CAR]['p_hash'] == p3[0]
  assert 'person' in by_reason[records.NON_CAR]['detail']


def test_csv_spans_latest_and_pinned(tmp_path, image_host):
  """exports/{SPAN}/cars.csv: a monthly export is a new span; the latest is read by default."""
  for span, hashes in ((1, GOOD[:1]), (2, GOOD[1:4])):
    d = tmp_path / 'exports' / str(span)
    d.mkdir(parents=True)
    (d / 'cars.csv').write_text(open(_csv(tmp_path, hashes)).read())
  pattern = str(tmp_path / 'exports' / '{SPAN}' / 'cars.csv')
  resolved = beam_ingest.resolve_csv(pattern)
  assert resolved['span'] == 2 and resolved['pattern'].endswith('/2/cars.csv')
  latest, _, _ = run_ingest(tmp_path / 'latest', csv=pattern,
                            image_url_template=image_host.url_template)
  pinned, _, _ = run_ingest(tmp_path / 'pinned', csv=pattern, span=1,
                            image_url_template=image_host.url_template)
  assert latest['rows'] == 3 and pinned['rows'] == 1


def test_rate_limiter_spaces_requests():
  import time
  from components.example_gen import fetch
  limiter = fetch.RateLimiter(50.0)
  t = time.monotonic()
  for _ in range(11):
    limiter.wait()
  assert time.monotonic() - t >= 10 / 50.0 - 1e-3  # never faster than the budget


def test_split_does_not_depend_on_mapping_order():
  """The pipeline passes the config as sorted JSON, the CLI as YAML order: same split."""
  a = {ad: records.split_for(ad, {'train': 80, 'eval': 20}) for ad in range(1000000, 1002000)}
  b = {ad: records.split_for(ad, {'eval': 20, 'train': 80}) for ad in range(1000000, 1002000)}
  assert a == b
  assert 0.15 < sum(v == 'eval' for v in a.values()) / len(a) < 0.25

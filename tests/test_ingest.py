"""Ingestion with real parts: PostgreSQL, an HTTP photo host on loopback, Beam."""
import io
import os

import pytest
from PIL import Image

from carvision.components.example_gen import beam_ingest, records
from tests.helpers import TINY
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
  assert set(ads) == {'train', 'validation', 'test'} and all(ads.values())
  assert not ads['train'] & ads['validation'] and not ads['train'] & ads['test']
  assert not ads['validation'] & ads['test']
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


def test_trickling_host_hits_the_fetch_deadline_and_the_rest_goes_on(tmp_path, image_host):
  """One byte every 0.2 s never trips the 1 s read timeout; the 2 s deadline cuts it."""
  import time
  image_host.faults[GOOD[0]] = lambda k: ('trickle', 0.2)
  t = time.monotonic()
  summary, dead, examples = run_ingest(
      tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0], GOOD[1], GOOD[2]]),
      image_url_template=image_host.url_template, max_dead_letter_share=1.0,
      http={'read_timeout_s': 1.0, 'deadline_s': 2.0, 'retries': 1, 'backoff_factor': 0.01})
  assert time.monotonic() - t < 30  # that photo alone would take about an hour at this rate
  assert summary['dead_letters'] == {records.TIMEOUT: 1}
  assert dead[0]['p_hash'] == GOOD[0] and 'deadline_s' in dead[0]['detail']
  assert sum(len(e) for e in examples.values()) == 2


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
  from carvision.pipeline import services
  from tests.helpers import SHARED_FULL
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


def test_image_rows_with_null_ad_id_are_dead_letters_counted_at_the_source(
    tmp_path, postgres, image_host, tiny_labels, tiny_manifest):
  """A NULL ad_id is in no ad_id range: it is read by a partition of its own, becomes a
  bad_row dead letter, and `rows` is the database's count, not examples + dead letters."""
  (a1, p1), = _pick_ads(tiny_labels, tiny_manifest, 1)
  dsn = _edit_db(postgres, 'null_ad', [
      ('DELETE FROM app.ad_images WHERE ad_id <> %s', (a1,)),
      ('DELETE FROM app.ads WHERE id <> %s', (a1,)),
      ('UPDATE app.ad_images SET ad_id = NULL WHERE p_hash = %s', (p1[0],)),
  ])
  summary, dead, examples = run_ingest(tmp_path, dsn=dsn, image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0, partitions=3)
  assert summary['rows'] == len(p1)
  assert summary['dead_letters'] == {records.BAD_ROW: 1}
  assert dead[0]['p_hash'] == p1[0] and dead[0]['ad_id'] is None and 'NULL' in dead[0]['detail']
  assert sum(len(e) for e in examples.values()) == len(p1) - 1


def test_rows_neither_example_nor_dead_letter_fail_the_run():
  """The source's count is checked against what the rows became."""
  summary = beam_ingest._summary([('read:', 5), ('example:train', 3), ('dead:http_404', 1)],
                                 ['train', 'validation', 'test'], source_rows=5)
  assert summary['unaccounted'] == 1
  with pytest.raises(RuntimeError, match='1 became neither'):
    beam_ingest.check_share(summary, 1.0)
  short = beam_ingest._summary([('read:', 4), ('example:train', 4)], ['train'], source_rows=5)
  with pytest.raises(RuntimeError, match='source holds 5 rows but 4 were read'):
    beam_ingest.check_share(short, 1.0)
  ok = beam_ingest._summary([('read:', 4), ('example:train', 4)], ['train'], source_rows=4)
  assert ok == {'rows': 4, 'examples': {'train': 4}, 'dead_letters': {}}
  beam_ingest.check_share(ok, 0.0)


def test_csv_faults_are_counted_rows_with_their_line(tmp_path, image_host):
  """A non-UTF-8 byte spoils one record, not the ingest; a quoted newline is one record;
  a file without a header keeps its first row; details name file and line."""
  h = GOOD[:6]
  good = [f'{1000 + i},BMW,X6,SUV 2012,{h[i]}' for i in range(3)]
  with_header = tmp_path / 'a.csv'
  with_header.write_bytes(
      b'ad_id,make,model,submodel,hashish\n' + good[0].encode() + b'\n'
      + b'2001,Citro\xebn,C4,Hatch 2010,' + h[3].encode() + b'\n'  # Latin-1, not UTF-8
      + f'2002,BMW,X6,"SUV\n2012","{h[4]}"\n'.encode()           # quoted newline
      + b'2003,BMW,X6\n')                                          # 3 fields, line 6
  no_header = tmp_path / 'b.csv'
  no_header.write_text('\n'.join(good[1:]) + '\n')
  summary, dead, examples = run_ingest(tmp_path / 'out', csv=str(tmp_path / '*.csv'),
                                       image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  assert summary['rows'] == 6
  assert sum(len(e) for e in examples.values()) == 4  # good x3 + the quoted-newline record
  assert summary['dead_letters'] == {records.BAD_ROW: 2}
  details = sorted(d['detail'] for d in dead)
  assert details[0].startswith('a.csv:3: not UTF-8')
  assert details[1].startswith('a.csv:6: 3 fields')


def test_csv_pattern_matching_nothing_is_a_clear_error(tmp_path, image_host):
  with pytest.raises(ValueError, match=r'ingest.csv: no file matches'):
    run_ingest(tmp_path / 'out', csv=str(tmp_path / 'nothing-*.csv'),
               image_url_template=image_host.url_template)


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
  from carvision.components.example_gen import fetch
  limiter = fetch.RateLimiter(50.0)
  t = time.monotonic()
  for _ in range(11):
    limiter.wait()
  assert time.monotonic() - t >= 10 / 50.0 - 1e-3  # never faster than the budget


def test_split_does_not_depend_on_mapping_order():
  """The pipeline passes the config as sorted JSON, the CLI as YAML order: same split."""
  ads = range(1000000, 1003000)
  a = {ad: records.split_for(ad, {'train': 70, 'validation': 10, 'test': 20}) for ad in ads}
  b = {ad: records.split_for(ad, {'test': 20, 'validation': 10, 'train': 70}) for ad in ads}
  assert a == b
  for name, share in (('train', 0.7), ('validation', 0.1), ('test', 0.2)):
    assert abs(sum(v == name for v in a.values()) / len(a) - share) < 0.03
  # The documented mapping of old two-split configs: test holds exactly the old eval ads.
  old = {ad: records.split_for(ad, {'train': 80, 'eval': 20}) for ad in ads}
  assert {ad for ad, v in a.items() if v == 'test'} == {ad for ad, v in old.items() if v == 'eval'}


@pytest.mark.parametrize('splits, message', [
    ({'train': 80, 'eval': 20}, 'test = the old eval ads'),
    ({'train': 80, 'test': 20}, 'needs exactly the splits'),
    ({'train': 70, 'validation': 0, 'test': 30}, 'positive integer'),
    ({'train': 70, 'validation': 'ten', 'test': 20}, 'positive integer'),
])
def test_splits_other_than_train_validation_test_are_refused(splits, message):
  from carvision.pipeline import config
  with pytest.raises(ValueError, match=message):
    config.load('demo', {'ingest.splits': splits})


def test_exif_rotated_photo_is_stored_upright(tmp_path, image_host):
  """Phones write the camera's orientation in EXIF; TensorFlow's decoder ignores it, so the
  example holds the upright photo (what `predict` decodes from the original)."""
  import tensorflow as tf
  from carvision.components import images
  src = Image.new('RGB', (64, 32), (200, 10, 10))  # wider than high
  exif = Image.Exif()
  exif[images.EXIF_ORIENTATION] = 6
  buf = io.BytesIO()
  src.convert('RGB').transpose(Image.Transpose.ROTATE_90).save(buf, 'JPEG', quality=95, exif=exif)
  image_host.faults[GOOD[0]] = lambda k: (200, buf.getvalue())
  summary, _, examples = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [GOOD[0]]),
                                    image_url_template=image_host.url_template,
                                    p_hash_max_distance=None)  # a made-up photo under a real name
  assert summary['dead_letters'] == {} and summary['rows'] == 1
  (ex,) = [e for split in examples.values() for e in split]
  stored = ex.features.feature['image/encoded'].bytes_list.value[0]
  h, w = images.decode_full_tf(tf.constant(stored)).shape[:2]
  assert (w, h) == src.size  # upright, not the sideways stored pixels
  assert ex.features.feature['image/width'].int64_list.value[0] == src.size[0]


def test_an_unterminated_quote_costs_one_row_each_other_line_is_read(tmp_path, image_host):
  """A quote opened and never closed used to swallow every line up to the next quote into
  one bad_row: now the broken line is the bad_row (with its line) and the rest are read."""
  h = GOOD[:6]
  f = tmp_path / 'cars.csv'
  f.write_text('ad_id,make,model,submodel,hashish\n'
               f'3001,"BMW,X6,SUV 2012,{h[0]}\n'            # line 2: the quote never closes
               f'3002,BMW,X6,SUV 2012,{h[1]}\n'
               f'3003,BMW,X6,SUV 2012,"{h[2]},{h[3]}"\n'     # the next quote: closes the region
               f'3004,BMW,X6,SUV 2012,{h[4]}\n'
               f'3005,BMW,X6,"SUV\n2012",{h[5]}\n')          # a quoted line break: one record
  summary, dead, examples = run_ingest(tmp_path / 'out', csv=str(f),
                                       image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  assert summary['rows'] == 6
  assert summary['dead_letters'] == {records.BAD_ROW: 1}
  assert dead[0]['detail'].startswith('cars.csv:2: unbalanced quote')
  got = sorted(ex.features.feature['ad_id'].int64_list.value[0]
               for exs in examples.values() for ex in exs)
  assert got == [3002, 3003, 3003, 3004, 3005]


def test_names_with_the_class_separator_non_ascii_names_and_odd_detections(
    tmp_path, postgres, image_host, tiny_labels, tiny_manifest):
  """A name holding '|' (the class separator) is a missing_label with the reason; Citroën
  and Škoda reach the examples' labels unchanged; yolo_classification NULL, a list of
  non-objects or a non-numeric confidence is a non_car photo, a JSON string holding the
  list is read as the list (a doubly encoded export)."""
  clean = _pick_ads(tiny_labels, tiny_manifest, 100)
  (a3, p3), = [c for c in clean if len(c[1]) >= 4][:1]
  (a1, p1), (a2, p2) = [c for c in clean if c[0] != a3][:2]
  keep = [a1, a2, a3]
  car = '[{"class_name": "car", "confidence": 0.9, "bbox": [1, 1, 30, 30]}]'
  dsn = _edit_db(postgres, 'names_and_detections', [
      ('DELETE FROM app.ad_images WHERE NOT (ad_id = ANY(%s))', (keep,)),
      ('DELETE FROM app.ads WHERE NOT (id = ANY(%s))', (keep,)),
      ("INSERT INTO static.makes (id, name) VALUES (9001, 'Citroën'), (9002, 'A|B')", None),
      ("INSERT INTO static.models (id, make_id, name) VALUES (9001, 9001, 'Škoda Octavia')", None),
      ('ALTER TABLE app.ad_images ALTER COLUMN yolo_classification DROP NOT NULL', None),
      ('INSERT INTO static.models_submodels (model_id, submodel_id) SELECT 9001, submodel_id '
       'FROM app.ads WHERE id = %s', (a1,)),
      ('UPDATE app.ads SET make_id = 9001, model_id = 9001 WHERE id = %s', (a1,)),
      ('UPDATE app.ads SET make_id = 9002 WHERE id = %s', (a2,)),
      ('UPDATE app.ad_images SET yolo_classification = NULL WHERE p_hash = %s', (p3[0],)),
      ('UPDATE app.ad_images SET yolo_classification = %s::jsonb WHERE p_hash = ANY(%s)',
       ('[1, "car", null]', p3[1:2])),
      ('UPDATE app.ad_images SET yolo_classification = to_jsonb(%s::text) WHERE p_hash = ANY(%s)',
       (car, p1)),
      ('UPDATE app.ad_images SET yolo_classification = %s::jsonb WHERE p_hash = ANY(%s)',
       ('[{"class_name": "car", "confidence": "high"}]', p3[2:3])),
  ])
  summary, dead, examples = run_ingest(tmp_path, dsn=dsn, image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  odd = p3[:3]
  assert summary['rows'] == len(p1) + len(p2) + len(p3)
  assert summary['dead_letters'] == {records.MISSING_LABEL: len(p2), records.NON_CAR: len(odd)}
  assert all("contains '|'" in d['detail'] for d in dead if d['reason'] == records.MISSING_LABEL)
  assert {d['p_hash'] for d in dead if d['reason'] == records.NON_CAR} == set(odd)
  labels = {ex.features.feature['p_hash'].bytes_list.value[0].decode():
            ex.features.feature['label/class'].bytes_list.value[0].decode('utf-8')
            for exs in examples.values() for ex in exs}
  assert {labels[p].split('|')[0] for p in p1} == {'Citroën'}
  assert {labels[p].split('|')[1] for p in p1} == {'Škoda Octavia'}
  assert set(labels) == set(p1) | set(p3[3:])


def test_csv_with_a_byte_order_mark_or_semicolons_reads_like_the_plain_export(tmp_path, image_host):
  """Spreadsheet exports: a UTF-8 byte-order mark before the header, ';' between columns
  (the quoted hashish keeps its commas). Both read as the plain file does."""
  h = GOOD[:4]
  plain = ('ad_id,make,model,submodel,hashish\n'
           f'4001,Citroën,C4,Hatch 2010,"{h[0]},{h[1]}"\n4002,BMW,X6,SUV 2012,{h[2]}\n')
  semi = ('ad_id;make;model;submodel;hashish\n'
          f'4001;Citroën;C4;Hatch 2010;"{h[0]},{h[1]}"\n4002;BMW;X6;SUV 2012;{h[2]}\n')
  want = [(r.ad_id, r.p_hash, r.make, r.submodel, r.reason)
          for r in records.rows_from_csv(plain.encode(), 'a.csv')]
  assert len(want) == 3 and want[0][2] == 'Citroën' and not any(w[4] for w in want)
  for text in ('\ufeff' + plain, semi, '\ufeff' + semi, semi.split('\n', 1)[1]):
    got = [(r.ad_id, r.p_hash, r.make, r.submodel, r.reason)
           for r in records.rows_from_csv(text.encode('utf-8'), 'a.csv')]
    assert got == want, text[:40]
  f = tmp_path / 'cars.csv'
  f.write_bytes(('\ufeff' + semi).encode('utf-8'))
  summary, dead, examples = run_ingest(tmp_path / 'out', csv=str(f),
                                       image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  assert summary['rows'] == 3 and not dead and sum(len(e) for e in examples.values()) == 3


def test_a_host_serving_another_photo_under_a_name_is_a_p_hash_mismatch(tmp_path, image_host):
  """The p_hash is the photo's perceptual hash: another photo served under it is caught
  (its own reason, with the distance); the same photo re-encoded and resized is not."""
  a, b, c = GOOD[0], GOOD[1], GOOD[2]
  other = open(os.path.join(TINY, 'images', b + '.jpg'), 'rb').read()
  photo = Image.open(os.path.join(TINY, 'images', c + '.jpg'))
  buf = io.BytesIO()
  photo.resize((photo.width * 9 // 10, photo.height * 9 // 10)).save(buf, 'JPEG', quality=60)
  image_host.faults[a] = lambda k: (200, other)
  image_host.faults[c] = lambda k: (200, buf.getvalue())
  summary, dead, examples = run_ingest(tmp_path / 'out', csv=_csv(tmp_path, [a, b, c]),
                                       image_url_template=image_host.url_template,
                                       max_dead_letter_share=1.0)
  assert summary['dead_letters'] == {records.P_HASH_MISMATCH: 1}
  assert dead[0]['p_hash'] == a and f'hashes to {b}' in dead[0]['detail']
  assert sum(len(e) for e in examples.values()) == 2
  summary, _, _ = run_ingest(tmp_path / 'off', csv=_csv(tmp_path, [a]),
                             image_url_template=image_host.url_template, p_hash_max_distance=None)
  assert summary['dead_letters'] == {}  # the check can be switched off

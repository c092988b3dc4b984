"""The carvision CLI as a user runs it: a subprocess against real PostgreSQL and HTTP."""
import csv
import json
import os
import subprocess
import sys

from tests.helpers import REPO, SHIPPED, TINY, run_cli


_cli = run_cli


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


def _one_line_error(res, code, *fragments):
  """A user error: the named exit code, one `error:` line naming the problem, no traceback."""
  assert res.returncode == code, (res.returncode, res.stderr[-2000:])
  lines = [l for l in res.stderr.splitlines() if l.startswith('error:') or 'usage:' in l]
  assert lines, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr, res.stderr[-2000:]
  for f in fragments:
    assert f in res.stderr, (f, res.stderr[-2000:])


def test_no_arguments_version_and_bad_top_k():
  res = _cli()
  assert res.returncode == 2 and "invalid choice: ''" not in res.stderr
  assert 'COMMAND' in res.stderr
  res = _cli('--version')
  assert res.returncode == 0 and res.stdout.startswith('carvision ')
  for k in ('0', '-1', 'x'):
    res = _cli('predict', '--top-k', k, os.path.join(TINY, 'images', 'x.jpg'))
    assert res.returncode == 2 and 'a whole number >= 1' in res.stderr


def test_password_in_a_dsn_is_refused_everywhere_and_never_printed(tmp_path):
  dsn = 'host=127.0.0.1 dbname=seez user=u password=hunter2'
  for args in (('run', '--set', f'ingest.dsn={dsn}'),
               ('ingest', '--dsn', dsn, '--out', str(tmp_path / 'o')),
               ('export', '--dsn', 'postgresql://u:hunter2@127.0.0.1/seez', '--out', str(tmp_path / 'c.csv'))):
    res = _cli(*args)
    _one_line_error(res, 2, 'contains a password', 'PGPASSWORD')
    assert 'hunter2' not in res.stderr + res.stdout
  res = _cli('demo', env={'CARVISION_DSN': dsn})
  _one_line_error(res, 2, 'CARVISION_DSN contains a password')


def test_source_errors_are_one_line_with_the_setting_to_fix(tmp_path):
  from carvision.pipeline.services import free_port
  nobody = f'host=127.0.0.1 port={free_port()} dbname=seez user=postgres connect_timeout=3'
  _one_line_error(_cli('ingest', '--dsn', nobody, '--out', str(tmp_path / 'a')), 3,
                  'error: database:', 'PGPASSWORD')
  _one_line_error(_cli('run', '--set', f'ingest.dsn={nobody}'), 3, 'error: database:')
  _one_line_error(_cli('ingest', '--dsn', 'host=127.0.0.1 = =', '--out', str(tmp_path / 'b')), 2,
                  'not a libpq connection string')
  _one_line_error(_cli('ingest', '--csv', str(tmp_path / 'none-*.csv'), '--out', str(tmp_path / 'c')),
                  2, 'ingest.csv: no file matches')
  _one_line_error(_cli('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--image-url-template',
                       'http://127.0.0.1/photos/', '--out', str(tmp_path / 'd')),
                  2, 'must contain {p_hash}')
  _one_line_error(_cli('run', '--config', 'no-such-config'), 2, "no config 'no-such-config'")
  _one_line_error(_cli('run', '--set', 'ingest.splits={train: 80, eval: 20}'), 2,
                  'test = the old eval ads')


def test_evaluate_exit_code_follows_the_gate():
  """A CI job relies on it: a failed gate exits 4 and prints the verdict."""
  common = ('evaluate', '--data', TINY, '--limit', '24')
  res = _cli(*common, '--top1-min', '1.0')
  assert res.returncode == 4, res.stderr[-2000:]
  assert 'verdict: FAIL' in res.stdout
  assert not any(l.startswith('{') for l in res.stdout.splitlines())  # human lines only
  res = _cli(*common, '--top1-min', '1.0', '--json')
  assert res.returncode == 4, res.stderr[-2000:]
  out = json.loads(res.stdout)
  assert out['passed'] is False and out['checks']['top1_accuracy']['threshold'] == 1.0
  res = _cli(*common, '--top1-min', '0', '--top5-min', '0', '--json')
  assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])['passed'] is True
  # thresholds default to the config's gates
  res = _cli(*common, '--json', '--set', 'evaluate.top1_min=1.0')
  assert res.returncode == 4
  assert json.loads(res.stdout.strip().splitlines()[-1])['checks']['top1_accuracy']['threshold'] == 1.0


def _model_that_saw(tmp_path, ads):
  """The shipped TFLite file in a version directory whose seen_ads.json lists `ads`."""
  import shutil
  model = tmp_path / 'model'
  model.mkdir(parents=True)
  for name in ('model.tflite', 'labels.txt', 'make_labels.txt', 'serve.json'):
    if os.path.exists(os.path.join(SHIPPED, name)):
      shutil.copy(os.path.join(SHIPPED, name), model)
  ads = sorted(ads)
  (model / 'seen_ads.json').write_text(json.dumps({'train': ads[1:], 'validation': ads[:1]}))
  return str(model)


def test_evaluate_leaves_out_the_ads_the_model_saw(tmp_path):
  """A gate on photos the model trained on passes anything (the embedded sample is part of
  the data the shipped model learnt from): they are left out, counted, and with nothing left
  the gate fails (exit 4) instead of passing."""
  rows = list(csv.DictReader(open(os.path.join(TINY, 'labels.csv'))))
  ads = {int(r['ad_id']) for r in rows}
  res = _cli('evaluate', '--model', _model_that_saw(tmp_path / 'all', ads), '--data', TINY,
             '--top1-min', '0.999', '--limit', '16')
  _one_line_error(res, 4, 'of ads the model trained on or was chosen on')
  half = sorted(ads)[::2]
  n_half = sum(int(r['ad_id']) in set(half) for r in rows)
  res = _cli('evaluate', '--model', _model_that_saw(tmp_path / 'half', half), '--data', TINY,
             '--top1-min', '0', '--top5-min', '0', '--json')
  assert res.returncode == 0, res.stderr[-2000:]
  assert json.loads(res.stdout)['skipped']['seen_by_model'] == n_half
  res = _cli('evaluate', '--model', _model_that_saw(tmp_path / 'all2', ads), '--data', TINY,
             '--top1-min', '0', '--top5-min', '0', '--json', '--include-seen', '--limit', '8')
  assert res.returncode == 0 and json.loads(res.stdout)['examples'] == 8
  # a floor the figure misses exits 4 whatever its decimals; the threshold is printed as given
  res = _cli('evaluate', '--model', _model_that_saw(tmp_path / 'half2', half), '--data', TINY,
             '--top1-min', '0.999')
  assert res.returncode == 4 and 'threshold >= 0.999' in res.stdout, res.stdout[-2000:]


def test_predict_answers_the_good_photos_and_names_each_bad_one(tmp_path):
  """Formats a phone sends (JPEG, PNG, WebP, rotated by EXIF) are answered alike; the rest
  are one error line each, and the good photos are still answered."""
  from PIL import Image
  good = os.path.join(TINY, 'images', sorted(os.listdir(os.path.join(TINY, 'images')))[0])
  photo = Image.open(good)
  png, webp, gif = tmp_path / 'photo.png', tmp_path / 'photo.webp', tmp_path / 'photo.gif'
  photo.save(png)
  photo.save(webp, lossless=True)
  photo.save(gif)
  rotated = tmp_path / 'rotated.jpg'  # stored sideways, EXIF says: turn 90 degrees back
  exif = Image.Exif()
  exif[0x0112] = 6
  photo.transpose(Image.Transpose.ROTATE_90).save(rotated, quality=100, exif=exif)
  truncated = tmp_path / 'cut.jpg'
  truncated.write_bytes(open(good, 'rb').read()[:2000])
  missing = tmp_path / 'missing.jpg'
  inputs = [good, png, webp, rotated, gif, truncated, missing]
  res = _cli('predict', '--json', '--top-k', '3', *map(str, inputs))
  assert res.returncode == 5, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr
  out = json.loads(res.stdout)
  answered = {o['input']: o['top_k'] for o in out if 'top_k' in o}
  failed = {o['input']: o['error'] for o in out if 'error' in o}
  assert list(answered) == [good, str(png), str(webp), str(rotated)]
  # the same pixels give the same answer; the re-encoded upright photo the same class
  assert answered[str(png)] == answered[str(webp)] == answered[good]
  assert answered[str(rotated)][0]['label'] == answered[good][0]['label']
  assert failed[str(gif)].startswith('unsupported_format: GIF') and 'PNG' in failed[str(gif)]
  assert failed[str(truncated)].startswith('corrupt')
  assert failed[str(missing)].startswith('unreadable')
  assert sum(l.startswith('error: ') for l in res.stderr.splitlines()) == 3


def test_predict_and_evaluate_on_tflite_run_without_tensorflow():
  """A phone team's Python has LiteRT, Pillow and NumPy: importing TensorFlow is refused
  here, and the answers are the same; no TensorFlow/CUDA start-up noise on stderr."""
  photos = [os.path.join(TINY, 'images', p) for p in sorted(os.listdir(os.path.join(TINY, 'images')))[:3]]
  block = ('import sys; sys.modules.update(tensorflow=None, tensorflow_transform=None, '
           'tf_keras=None, tfx=None); from carvision.pipeline import cli; sys.exit(cli.main(sys.argv[1:]))')
  for args in (('predict', '--json', *photos),
               ('evaluate', '--data', TINY, '--limit', '8', '--top1-min', '0', '--top5-min', '0',
                '--json')):
    slim = subprocess.run([sys.executable, '-c', block, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert slim.returncode == 0, slim.stderr[-2000:]
    noise = [l for l in slim.stderr.splitlines() if not l.startswith('note: ')]
    assert not noise, slim.stderr[-2000:]
    assert json.loads(slim.stdout) == json.loads(_cli(*args).stdout)


def test_ingest_out_is_replaced_whole_only_with_overwrite(tmp_path, image_host):
  out = tmp_path / 'out'
  common = ('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--image-url-template',
            image_host.url_template, '--out', str(out))
  assert _cli(*common).returncode == 0
  old_shard = out / 'examples' / 'Split-train' / 'data_tfrecord-00099-of-00100.gz'
  old_shard.write_bytes(b'a shard of another run')
  stale = tmp_path / '.out.partial-1'  # what an interrupted run leaves
  stale.mkdir()
  _one_line_error(_cli(*common), 2, 'is not empty: pass --overwrite')
  res = _cli(*common, '--overwrite')
  assert res.returncode == 0, res.stderr[-2000:]
  assert not old_shard.exists() and (out / 'examples' / 'Split-test').is_dir()
  assert not stale.exists() and not list(tmp_path.glob('.out.partial-*'))
  assert not list(out.rglob('beam-temp-*'))


def test_evaluate_checks_labels_csv_first_and_names_unknown_classes(tmp_path):
  import shutil
  rows = list(csv.DictReader(open(os.path.join(TINY, 'labels.csv'))))
  good = [r for r in rows if r['is_car'] == 'true' and r['file_ok'] == 'true'][:4]
  data = tmp_path / 'data'
  (data / 'images').mkdir(parents=True)
  for r in good:
    shutil.copy(os.path.join(TINY, 'images', r['p_hash'] + '.jpg'), data / 'images')
  good[0] = {**good[0], 'make': 'Tesla', 'model': 'Cybertruck', 'submodel': 'Pickup 2024'}
  with open(data / 'labels.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=['ad_id', 'p_hash', 'make', 'model', 'submodel'],
                       extrasaction='ignore')
    w.writeheader()
    w.writerows(good)
  gate = ('--top1-min', '0', '--top5-min', '0', '--include-seen')
  res = _cli('evaluate', '--data', str(data), *gate)
  assert res.returncode == 0, res.stderr[-2000:]
  assert ('1 photos are of 1 classes the model does not know (counted wrong above and in the '
          'gate): Tesla|Cybertruck|Pickup 2024 (1)') in res.stdout
  assert 'photos of classes the model knows 3: top-1' in res.stdout  # scored apart
  res = _cli('evaluate', '--data', str(data), *gate, '--json')
  out = json.loads(res.stdout)
  assert out['examples'] == 4 and out['unknown_classes'] == 1
  assert out['unknown_class_names'] == ['Tesla|Cybertruck|Pickup 2024']
  assert out['unknown_class_photos'] == {'Tesla|Cybertruck|Pickup 2024': 1}
  assert out['known_classes']['examples'] == 3
  assert out['top1_accuracy'] <= 0.75 and out['known_classes']['top1_accuracy'] >= out['top1_accuracy']
  # a broken labels.csv fails at once, naming what is wrong
  (data / 'labels.csv').write_text('ad_id,p_hash,make\n1,abc,BMW\n')
  _one_line_error(_cli('evaluate', '--data', str(data)), 2, "missing columns ['model', 'submodel']")
  (data / 'labels.csv').write_text('ad_id,p_hash,make,model,submodel\n')
  _one_line_error(_cli('evaluate', '--data', str(data)), 2, 'labels.csv: no rows')
  _one_line_error(_cli('evaluate', '--data', str(tmp_path / 'nowhere')), 2, 'no such directory')


def test_predict_answers_class_else_make_else_not_sure_from_configured_thresholds():
  photo = os.path.join(TINY, 'images', sorted(os.listdir(os.path.join(TINY, 'images')))[0])
  decisions = {}
  for flags in (('--class-min-confidence', '0', '--make-min-confidence', '0'),
                ('--set', 'serve.class_min_confidence=1.0', '--make-min-confidence', '0'),
                ('--class-min-confidence', '1', '--make-min-confidence', '1')):
    res = _cli('predict', '--json', photo, *flags)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(res.stdout)[0]['decision']
    decisions[flags[1]] = d
  assert decisions['0']['decision'] == 'class' and decisions['0']['class_min_confidence'] == 0
  assert decisions['serve.class_min_confidence=1.0']['decision'] == 'make'
  assert decisions['1']['decision'] == 'not_sure' and decisions['1']['answer'] is None
  # the hierarchy: the class answered is of the make a fallback would answer
  assert decisions['0']['answer'].split('|')[0] == decisions['serve.class_min_confidence=1.0']['answer']
  res = _cli('predict', photo, '--class-min-confidence', '0', '--make-min-confidence', '0')
  assert res.returncode == 0 and '(' in res.stdout.splitlines()[0]


def test_a_config_with_a_yaml_syntax_error_is_named_at_its_line_and_column(tmp_path):
  """A typo in a config is the user's to fix (exit 2, file:line:column), not a defect (1)."""
  bad = tmp_path / 'bad.yaml'
  bad.write_text('extends: default.yaml\nmodel:\n  serving_views: [full, flip\n  dropout: 0.3\n')
  res = _cli('run', '--config', str(bad))
  _one_line_error(res, 2, f'{bad}:4:', 'YAML syntax error')
  assert 'a defect' not in res.stderr and 'ParserError' not in res.stderr
  (tmp_path / 'child.yaml').write_text('extends: bad.yaml\n')  # found through extends: too
  _one_line_error(_cli('ingest', '--config', str(tmp_path / 'child.yaml'), '--out',
                       str(tmp_path / 'o')), 2, f'{bad}:4:')
  _one_line_error(_cli('run', '--set', 'model.serving_views=[full'), 2,
                  '--set model.serving_views:1:', 'YAML syntax error')
  (tmp_path / 'list.yaml').write_text('- a\n- b\n')
  _one_line_error(_cli('run', '--config', str(tmp_path / 'list.yaml')), 2, 'a mapping of sections')


def test_a_gs_photo_host_without_credentials_is_one_line_before_any_work(tmp_path):
  """Without credentials every photo would become a connection_error after its retries."""
  env = {'HOME': str(tmp_path), 'GOOGLE_APPLICATION_CREDENTIALS': '', 'CLOUDSDK_CONFIG': str(tmp_path),
         'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9', 'NO_GCE_CHECK': 'True'}
  out = tmp_path / 'out'
  res = _cli('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--image-url-template',
             'gs://some-bucket/photos/{p_hash}.jpg', '--out', str(out), env=env)
  _one_line_error(res, 3, 'gs://some-bucket/photos/: no Google Cloud credentials',
                  'GOOGLE_APPLICATION_CREDENTIALS')
  assert not out.exists() and not res.stdout.strip()  # nothing ingested, no summary
  res = _cli('run', '--set', f"ingest.csv={os.path.join(TINY, 'cars.csv')}", '--set',
             'ingest.image_url_template=gs://some-bucket/photos/{p_hash}.jpg', '--set',
             f'pipeline.root={tmp_path / "root"}', env=env)
  _one_line_error(res, 3, 'no Google Cloud credentials')
  assert not (tmp_path / 'root').exists()


def test_predict_answers_non_ascii_names(tmp_path):
  """Citroën and Škoda come back as written, in JSON and on the terminal."""
  import shutil
  model = tmp_path / 'model'
  model.mkdir()
  shutil.copy(os.path.join(SHIPPED, 'model.tflite'), model)
  labels = open(os.path.join(SHIPPED, 'labels.txt'), encoding='utf-8').read().split('\n')
  renamed = ['Škoda-' + l if l else l for l in labels]  # every class's make non-ASCII
  (model / 'labels.txt').write_text('\n'.join(renamed), encoding='utf-8')
  photo = os.path.join(TINY, 'images', sorted(os.listdir(os.path.join(TINY, 'images')))[0])
  res = _cli('predict', '--model', str(model / 'model.tflite'), '--json', photo,
             env={'PYTHONIOENCODING': 'utf-8'})
  assert res.returncode == 0, res.stderr[-2000:]
  top = json.loads(res.stdout)[0]['top_k'][0]
  assert top['make'].startswith('Škoda-') and top['label'].startswith('Škoda-')
  res = _cli('predict', '--model', str(model / 'model.tflite'), photo)
  assert res.returncode == 0 and 'Škoda-' in res.stdout, res.stderr[-2000:]


def test_two_runs_on_one_pipeline_root_or_two_ingests_into_one_out(tmp_path):
  """The second stops at once with exit 6 naming the first (no shared ML Metadata, no mixed
  shards); a holder killed with SIGKILL leaves nothing held."""
  import signal
  root = tmp_path / 'root'
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from carvision.pipeline import config, run\n'
       f'cfg = config.load("demo", {{"pipeline.root": {str(root)!r}}})\n'
       'with run.root_lock(cfg):\n  print("held", flush=True); time.sleep(600)'],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    for cmd in (('run',), ('demo', '--fresh')):
      res = _cli(*cmd, '--config', 'demo', '--set', f'pipeline.root={root}', '--set',
                 f"ingest.csv={os.path.join(TINY, 'cars.csv')}")
      _one_line_error(res, 6, f'pipeline root {root} is in use by pid {holder.pid}')
    assert (root / '.carvision.lock').exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  from carvision.pipeline import config, run
  with run.root_lock(config.load('demo', {'pipeline.root': str(root)})):
    pass  # free again once the holder is gone
  out = tmp_path / 'out'
  writer = subprocess.Popen(
      [sys.executable, '-c', 'import time; from carvision.pipeline import outdir\n'
       f'with outdir.fresh_output({str(out)!r}, False):\n  print("held", flush=True); time.sleep(600)'],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == 'held'
    res = _cli('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--out', str(out))
    _one_line_error(res, 6, f'--out {out}: another carvision ingest is writing there')
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait()


def test_predict_takes_a_folder_of_500_photos_streams_them_and_shows_progress(tmp_path):
  """Every photo under a folder is answered in order, in batches (one batch of pixels in
  memory), with a progress bar on stderr; other files in the folder are not photos."""
  import shutil
  import tensorflow as tf

  @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.uint8, name='pixels')])
  def tiny(pixels):  # a real TFLite classifier of 3 classes, fast enough for 500 photos
    x = tf.reduce_mean(tf.cast(pixels, tf.float32), axis=[1, 2]) / 255.0
    return tf.nn.softmax(tf.matmul(x, tf.constant([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])))
  model = tmp_path / 'model'
  model.mkdir()
  (model / 'model.tflite').write_bytes(tf.lite.TFLiteConverter.from_concrete_functions(
      [tiny.get_concrete_function()]).convert())
  (model / 'labels.txt').write_text('Audi|A4|Sedan 2012\nBMW|X6|SUV 2012\nCitroën|C4|Hatch 2010\n')
  photos = [p for p in sorted(os.listdir(os.path.join(TINY, 'images')))][:100]
  folder = tmp_path / 'photos'
  for i in range(500):
    sub = folder / f'day{i % 5}'
    sub.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(TINY, 'images', photos[i % len(photos)]), sub / f'{i:03d}.jpg')
  (folder / 'notes.txt').write_text('not a photo')
  (tmp_path / 'empty').mkdir()
  res = _cli('predict', '--model', str(model / 'model.tflite'), '--json', '--top-k', '2',
             str(folder), str(tmp_path / 'empty'))
  out = json.loads(res.stdout)
  answers = [o for o in out if 'top_k' in o]
  failed = {o['input']: o['error'] for o in out if 'error' in o}
  bad_files = {p for p in failed if p != str(tmp_path / 'empty')}  # the sample's corrupt files
  assert res.returncode == 5 and failed[str(tmp_path / 'empty')].startswith('no photo')
  assert len(answers) + len(bad_files) == 500
  expected = sorted(str(folder / f'day{i % 5}' / f'{i:03d}.jpg') for i in range(500))
  assert [a['input'] for a in answers] == [p for p in expected if p not in bad_files]
  assert 'predict: 100%' in res.stderr and '500/500' in res.stderr
  res = _cli('predict', '--model', str(model / 'model.tflite'), '--ad', '--json', str(folder / 'day0'))
  assert len(json.loads(res.stdout)['input']) == 100 - sum(p.startswith(str(folder / 'day0')) for p in bad_files)


def _cli_bg(*args):
  return subprocess.Popen([sys.executable, '-m', 'carvision.pipeline.cli', *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ingest_stopped_at_several_moments_then_run_again(tmp_path):
  """SIGINT or SIGTERM before the first photo, mid-fetch or late: exit 130 / 143, nothing
  half-written at --out, no staging left; the same command then completes."""
  import signal
  import time
  from tests.photo_host import FaultyImageHost
  host = FaultyImageHost(os.path.join(TINY, 'images'), latency_s=0.3)
  try:
    out = tmp_path / 'out'
    cmd = ('ingest', '--csv', os.path.join(TINY, 'cars.csv'), '--image-url-template',
           host.url_template, '--out', str(out))
    for sig, after_hits, code in ((signal.SIGTERM, 0, 143), (signal.SIGINT, 20, 130),
                                  (signal.SIGTERM, 120, 143)):
      host.hits.clear()
      proc = _cli_bg(*cmd)
      deadline = time.time() + 120
      while sum(host.hits.values()) < max(after_hits, 1) and proc.poll() is None \
          and time.time() < deadline:
        time.sleep(0.05)
      if after_hits == 0:
        time.sleep(0.5)  # still starting: the photos have not been asked for yet
      proc.send_signal(sig)
      _, err = proc.communicate(timeout=120)
      assert proc.returncode == code, (sig, proc.returncode, err[-2000:])
      assert 'run the same command again' in err and 'Traceback' not in err
      assert not out.exists(), sig
      assert not list(tmp_path.glob('.out.partial-*')), sig
    res = _cli(*cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary['rows'] == sum(summary['examples'].values()) + sum(summary['dead_letters'].values())
    assert (out / 'examples' / 'Split-train').is_dir()
  finally:
    host.stop()


def test_the_demo_answers_readable_photos_of_ads_the_model_never_saw(tmp_path):
  """The demo's two answers: photos of ads outside the model's seen_ads.json (inherited ads
  too), skipping photos the data's labels.csv marks as no car or unreadable, missing files,
  and rows without a numeric ad id; one photo per ad."""
  from carvision.pipeline import cli
  data = tmp_path / 'data'
  (data / 'images').mkdir(parents=True)
  for h in ('a1', 'b1', 'b2', 'c1', 'd1', 'e1', 'e2'):
    (data / 'images' / f'{h}.jpg').write_bytes(b'jpeg')
  rows = [('x', 'a1'), ('1', 'a1'), ('2', 'b1,b2'), ('3', 'c1,zz'), ('4', 'gone'),
          ('5', 'd1'), ('6', 'e1,e2')]
  with open(data / 'cars.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['ad_id', 'make', 'model', 'submodel', 'hashish'])
    for ad, hashes in rows:
      w.writerow([ad, 'Audi', f'A{ad}', '2012', hashes])
  bad = {'b1': ('false', 'true'), 'd1': ('true', 'false')}  # no car; unreadable
  with open(data / 'labels.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['ad_id', 'p_hash', 'is_car', 'file_ok'])
    for h in ('a1', 'b1', 'b2', 'c1', 'd1', 'e1', 'e2'):
      w.writerow([0, h, *bad.get(h, ('true', 'true'))])
  model = tmp_path / 'model'
  model.mkdir()
  (model / 'seen_ads.json').write_text(json.dumps({'train': [1], 'validation': [], 'inherited': [3]}))
  got = cli.unseen_photos(str(model), str(data), n=5)
  assert [(p['ad_id'], os.path.basename(p['path'])) for p in got] == [(2, 'b2.jpg'), (6, 'e1.jpg')]
  assert got[0]['listed'] == 'Audi | A2 | 2012'
  assert [p['ad_id'] for p in cli.unseen_photos(str(model), str(data), n=1)] == [2]
  (model / 'seen_ads.json').unlink()  # a model that does not say: every readable ad counts
  assert [p['ad_id'] for p in cli.unseen_photos(str(model), str(data), n=3)] == [1, 2, 3]

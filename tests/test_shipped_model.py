"""The blessed 196-class model committed under models/car_ads/ (issue #8): complete, consistent
with its model card, and usable by `carvision predict` on a fresh clone."""
import csv
import hashlib
import json
import os

import pytest

from tests.helpers import SHARED_FULL, SHIPPED, TINY, run_cli

# Until a model passes the gates on car_ads nothing is shipped (issue #8), and these are skipped.
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED, 'model_card.json')),
                                reason='no blessed car_ads model committed under models/car_ads/')


def _card():
  with open(os.path.join(SHIPPED, 'model_card.json')) as f:
    return json.load(f)


_cli = run_cli


def test_files_match_the_card_and_fit_a_phone():
  card = _card()
  for name in card['files']:
    path = os.path.join(SHIPPED, name)
    with open(path, 'rb') as f:
      data = f.read()
    assert hashlib.sha256(data).hexdigest() == card['files'][name]['sha256'], name
    assert len(data) == card['files'][name]['bytes']
  assert os.path.getsize(os.path.join(SHIPPED, 'model.tflite')) <= 10 * 2**20
  labels = open(os.path.join(SHIPPED, 'labels.txt')).read().splitlines()
  assert len(labels) == card['contract']['labels'] == 196 and len(set(labels)) == 196


def test_card_shows_a_blessed_model_and_how_it_was_made():
  card = _card()
  assert card['thresholds']['top1_min'] >= 0.80 and card['thresholds']['top5_min'] >= 0.95
  assert card['checks'] and all(c['pass'] for c in card['checks'].values()), card['checks']
  # The split the gates judged: `test` (three-split cards); a two-split card called it `eval`,
  # the same ads (configs: test = the old eval buckets).
  ev = card['metrics'][card.get('splits', {}).get('judged_on', 'eval')]
  assert ev['int8_tflite']['top1_accuracy'] >= 0.80 and ev['int8_tflite']['top5_accuracy'] >= 0.95
  assert card['command'].startswith('carvision run') and card['code_version']
  assert card['config']['model']['backbone'] and card['config']['evaluate']['top1_min'] >= 0.80
  assert card['data']['manifest']['images_sha256'] and len(card['data']['examples_fingerprint']) == 64
  assert card['data']['ingestion']['rows'] > 0 and card['training']['seconds'] > 0
  assert 'non-commercial' in open(os.path.join(SHIPPED, 'README.md')).read()


def test_embedded_metadata_labels_are_labels_txt():
  from carvision.components.trainer import tflite_metadata
  md = tflite_metadata.read(open(os.path.join(SHIPPED, 'model.tflite'), 'rb').read())
  assert md['labels'] == open(os.path.join(SHIPPED, 'labels.txt')).read().splitlines()


def test_release_says_its_terms_and_one_version_everywhere():
  """The training photos are non-commercial only: the file's metadata and the card say so;
  the metadata version is the card's; the card lists exactly the files shipped."""
  from carvision.components.trainer import tflite_metadata
  card = _card()
  md = tflite_metadata.read(open(os.path.join(SHIPPED, 'model.tflite'), 'rb').read())
  assert 'non-commercial' in md['license'].lower() and md['license'] == card['license']
  assert md['version'] == card['version']
  assert all(os.path.exists(os.path.join(SHIPPED, n)) for n in card['files']), card['files']


def test_predict_uses_the_shipped_model_by_default():
  with open(os.path.join(TINY, 'labels.csv')) as f:
    row = next(csv.DictReader(f))
  photo = os.path.join(TINY, 'images', row['p_hash'] + '.jpg')
  res = _cli('predict', photo, '--json', '--top-k', '5')
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout)
  out = out[0] if isinstance(out, list) else out
  labels = open(os.path.join(SHIPPED, 'labels.txt')).read().splitlines()
  probs = [p['probability'] for p in out['top_k']]
  assert [p['label'] for p in out['top_k']] and all(p['label'] in labels for p in out['top_k'])
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-3


@pytest.mark.skipif(not os.path.isdir(SHARED_FULL),
                    reason='../shared/data/car_ads is not present (only in the dev checkout)')
def test_shipped_model_passes_the_gates_on_the_test_split_again():
  """Re-scored outside the pipeline (labels.csv ground truth, test ads only: never trained on)."""
  res = _cli('evaluate', '--data', SHARED_FULL, '--split', 'test', '--json')
  assert res.returncode == 0, res.stderr[-2000:]
  m = json.loads(res.stdout.strip().splitlines()[-1])
  assert m['examples'] > 1000
  assert m['top1_accuracy'] >= 0.80 and m['top5_accuracy'] >= 0.95, m


def test_card_of_the_one_command_from_imagenet_weights():
  card = _card()
  ev = card['metrics']['test']
  assert ev['int8_tflite']['top1_accuracy'] >= 0.80 and ev['int8_tflite']['top5_accuracy'] >= 0.95
  assert ev['int8_tflite']['examples'] > 1000
  assert card['command'].startswith('carvision run --config car_ads --data ')
  assert card['training']['warm_start'] is None  # from ImageNet weights
  assert card['wall_seconds'] > 0 and isinstance(card['resumes'], int)
  assert card['machine']['cores'] >= 1 and 'cpu_flags' in card['machine']
  assert card['calibration']['split'] == 'validation'
  assert card['decision']['class_min_confidence'] is not None
  # the thresholds the app reads are the card's, their make answers judged as decide() gives them
  assert json.load(open(os.path.join(SHIPPED, 'serve.json'))) == card['decision']
  dec = card['metrics']['test']['int8_tflite']['answers']['decision']
  assert dec['make_min_confidence'] == card['decision']['make_min_confidence']
  assert dec['class']['accuracy'] >= 0.93 and dec['make']['accuracy'] >= 0.90


def test_it_ships_what_the_pipeline_pushes():
  """Both heads, the decision thresholds, the ads it saw, the weights a warm start continues."""
  import numpy as np
  from carvision.components import serving
  card = _card()
  for name in ('model.tflite', 'labels.txt', 'make_labels.txt', 'serve.json', 'seen_ads.json',
               'warm_start.npz'):
    assert name in card['files'], name
  model = serving.load(SHIPPED, 'tflite', threads=1)
  makes = open(os.path.join(SHIPPED, 'make_labels.txt')).read().splitlines()
  assert model.make_out is not None and int(model.make_out['shape'][-1]) == len(makes) > 10
  seen = json.load(open(os.path.join(SHIPPED, 'seen_ads.json')))
  assert set(seen) == {'train', 'validation'} and not set(seen['train']) & set(seen['validation'])
  assert len(seen['train']) > 1000 and len(seen['validation']) > 100
  with np.load(os.path.join(SHIPPED, 'warm_start.npz')) as w:
    assert w['class/kernel'].shape[-1] == 196 and w['make/kernel'].shape[-1] == len(makes)
    assert sum(k.startswith('backbone/') for k in w.files) > 100

"""Copies a pushed model version into models/car_ads/ (what `predict` / `evaluate` / `audit`
use by default), leaving out the files too big for the repository.

  scripts/env.sh run 'python scripts/ship_model.py runs/car_ads/serving/<version> [--root runs/car_ads]'

The model card travels unchanged except for its file list, which names what is here. A
version pushed before the Trainer wrote seen_ads.json gets it from the run's Transform
output (the train and validation ads: what trained and chose the model), and one without
warm_start.npz gets it from its SavedModel; the card says so.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from carvision.components import names  # noqa: E402

KEEP = (names.INT8, names.FAST, names.LABELS, names.MAKE_LABELS, names.SERVE, names.SEEN_ADS,
        names.WARM_START, names.MODEL_CARD, names.REPORT_HTML, names.REPORT_PNG, names.RISK_COVERAGE_PNG)
LEFT_OUT = (names.FP16, names.PUSHED_SAVED_MODEL)


def sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('version', help='a pushed version directory')
  ap.add_argument('--root', help="the run's pipeline root (for seen_ads.json from its Transform output)")
  ap.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'models', 'car_ads'))
  args = ap.parse_args()
  card = json.load(open(os.path.join(args.version, names.MODEL_CARD)))
  staging = args.out + '.partial'
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  readme = os.path.join(args.out, 'README.md')
  if os.path.exists(readme):
    shutil.copy(readme, staging)
  for name in KEEP:
    if os.path.exists(os.path.join(args.version, name)):
      shutil.copy(os.path.join(args.version, name), staging)
  if not os.path.exists(os.path.join(staging, names.SEEN_ADS)):
    if not args.root:
      sys.exit(f'{args.version} has no {names.SEEN_ADS}: pass --root (the run\'s pipeline root)')
    from carvision.components.trainer import export  # pylint: disable=g-import-not-at-top
    transformed = sorted(glob.glob(os.path.join(args.root, 'Transform', 'transformed_examples', '*')),
                         key=lambda d: int(os.path.basename(d)))[-1]
    seen = {split: export.ad_ids([os.path.join(transformed, f'Split-{split}', '*')])
            for split in ('train', 'validation')}
    with open(os.path.join(staging, names.SEEN_ADS), 'w') as f:
      json.dump(seen, f)
    card['seen_ads_added'] = {'from': transformed, 'why': 'the pipeline of this run did not yet '
                              'write seen_ads.json; these are the ads of the Transform output '
                              'the Trainer read (train) and chose on (validation)'}
  if not os.path.exists(os.path.join(staging, names.WARM_START)):
    # A version pushed before the Trainer wrote the weights file: from its SavedModel.
    import tf_keras as keras  # pylint: disable=g-import-not-at-top
    from carvision.components.trainer import warm_start  # pylint: disable=g-import-not-at-top
    full = keras.models.load_model(os.path.join(args.version, names.PUSHED_SAVED_MODEL), compile=False)
    warm_start.save_weights(full, os.path.join(staging, names.WARM_START))
    card['warm_start_added'] = {'from': names.PUSHED_SAVED_MODEL, 'why': 'the pipeline of this '
                                'run did not yet write the weights file; the same weights in float16'}
  files = {}
  for name in sorted(os.listdir(staging)):
    if name not in (names.MODEL_CARD, 'README.md'):
      files[name] = {'bytes': os.path.getsize(os.path.join(staging, name)),
                     'sha256': sha256(os.path.join(staging, name))}
  card['pushed_files'] = card.get('files')
  card['files'] = files
  card['left_out_of_the_repository'] = [n for n in LEFT_OUT if os.path.exists(os.path.join(args.version, n))]
  card['pushed_version_dir'] = os.path.abspath(args.version)
  with open(os.path.join(staging, names.MODEL_CARD), 'w') as f:
    json.dump(card, f, indent=1)
  old = args.out + '.old'
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(args.out):
    os.rename(args.out, old)
  os.rename(staging, args.out)
  shutil.rmtree(old, ignore_errors=True)
  print(json.dumps({'shipped': sorted(files), 'to': args.out}))


if __name__ == '__main__':
  main()

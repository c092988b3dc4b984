"""What seller mistakes in the train split do to the test figures, and what
`model.drop_label_issues` wins back: one short pipeline run per arm on the same export.

  scripts/env.sh run 'python bench/noisy_train.py --data ../shared/data/car_ads --rate 0.10'

Arms (each its own pipeline root under --out, skipped when its result exists, so a stopped
benchmark goes on where it was; `carvision run` itself resumes a stopped Trainer):
  clean        the export as it is;
  noisy        a share `--rate` of the train split's ads relabelled to other catalogued
               make|model|submodel triples (bench/audit_noise.inject: sibling submodel, other
               model of the make, other make, a third each);
  noisy_drop   the same noisy export with model.drop_label_issues on (the frozen network's
               out-of-fold linear probes audit the train ads before training);
  noisy_early  the same, audited by the network itself after `--audit-epoch` epochs of the
               body stage (model.label_audit_epoch), the stage going on without them;
               (`--relabel`: the drop arms relabel the flagged ads the audit is that sure of,
               model.label_audit_relabel);
  noisy_cross_fit  the same, audited by `--folds`-fold cross-fitting (model.label_audit_folds:
               the stages up to the body trained once per fold without the fold's ads score
               them; `--folds 1`: one pass on every train ad scores them in sample, with
               model.early_learning set), the run then trained without the flagged ads
               (`--audit-share`: how many, model.label_audit_share);
  oracle_drop  the export without the wrong ads' rows (the ads, not their listings, gone):
               what a drop that found exactly the wrong ads would win, the best any drop can do;
  noisy_small_loss  the same noisy export with model.drop_high_loss `--small-loss` (default
               --rate): each end-to-end batch leaves out its highest-loss photos;
  clean_small_loss  the clean export with it: what the option costs when labels are right;
  noisy_early_learning  the same noisy export with model.early_learning `--early-learning`
               (momentum `--early-learning-momentum`): early-learning regularisation;
  clean_early_learning  the clean export with it.
Only train ads are relabelled: validation and test keep their labels, so the test figures
(the TFLiteEvaluator's, int8 file) judge against the listed truth. The recipe is
bench/proxy.yaml (the production stages, shorter; `--recipe car_ads`: the production run,
about 75 min an arm): the gap between arms, not the level, is the figure. For the drop arms
the flagged ads are scored against the injected truth.
"""
import argparse
import csv
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import audit_noise  # noqa: E402  pylint: disable=wrong-import-position
import proxy  # noqa: E402  pylint: disable=wrong-import-position
from carvision.components import names  # noqa: E402
from carvision.components.example_gen import records  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402

ARMS = ('clean', 'noisy', 'noisy_drop', 'noisy_early', 'noisy_cross_fit', 'oracle_drop',
        'noisy_small_loss', 'clean_small_loss', 'noisy_early_learning', 'clean_early_learning')


def write_export(src: str, out_csv: str, rate: float, seed: int, splits) -> dict:
  """cars.csv with `rate` of the train split's ads relabelled; returns {ad_id: [kind, truth]}."""
  with open(src, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f))
  label = {int(r['ad_id']): names.CLASS_SEP.join((r['make'], r['model'], r['submodel']))
           for r in rows if r['submodel']}
  tree = audit_noise.catalogue([r for r in rows if r['submodel']])
  train = {a: l for a, l in label.items() if records.split_for(a, splits) == 'train'}
  listed, wrong = audit_noise.inject(train, tree, rate, random.Random(seed))
  os.makedirs(os.path.dirname(out_csv), exist_ok=True)
  with open(out_csv + '.tmp', 'w', encoding='utf-8', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
      ad = int(r['ad_id'])
      if ad in wrong:
        r = {**r, **dict(zip(('make', 'model', 'submodel'), names.split_label(listed[ad])))}
      w.writerow(r)
  os.replace(out_csv + '.tmp', out_csv)
  return {str(a): [k, train[a]] for a, k in wrong.items()}


def write_without(src: str, out_csv: str, ads) -> None:
  """cars.csv without the rows of `ads` (every other row as it is)."""
  with open(src, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f))
  os.makedirs(os.path.dirname(out_csv), exist_ok=True)
  with open(out_csv + '.tmp', 'w', encoding='utf-8', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(r for r in rows if r['ad_id'] not in ads)
  os.replace(out_csv + '.tmp', out_csv)


def class_vocabulary(root: str):
  """The class names by id of the arm's (latest) Transform graph."""
  import glob  # pylint: disable=g-import-not-at-top
  import tensorflow_transform as tft  # pylint: disable=g-import-not-at-top
  from carvision.components.trainer import export  # pylint: disable=g-import-not-at-top
  graphs = glob.glob(os.path.join(root, 'Transform', 'transform_graph', '*'))
  return export.labels(tft.TFTransformOutput(max(graphs, key=os.path.getmtime)), 'class')


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--data', required=True, help='a car_ads directory (cars.csv, images/)')
  ap.add_argument('--rate', type=float, default=0.10)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default=os.path.join(config_lib.REPO_ROOT, 'runs', 'bench', 'noisy_train'))
  ap.add_argument('--arms', default=','.join(ARMS))
  ap.add_argument('--audit-epoch', type=int, default=3, help='noisy_early: model.label_audit_epoch')
  ap.add_argument('--folds', type=int, default=2, help='noisy_cross_fit: model.label_audit_folds')
  ap.add_argument('--audit-share', type=float, default=0.0,
                  help="the drop arms: model.label_audit_share (0: cleanlab's count)")
  ap.add_argument('--relabel', type=float, default=0.0,
                  help='the drop arms: model.label_audit_relabel (0: flagged ads are left out)')
  ap.add_argument('--small-loss', type=float, default=None,
                  help='the *_small_loss arms: model.drop_high_loss (default --rate)')
  ap.add_argument('--early-learning', type=float, default=3.0,
                  help='the *_early_learning arms: model.early_learning')
  ap.add_argument('--early-learning-momentum', type=float, default=0.7,
                  help='the *_early_learning arms: model.early_learning_momentum')
  ap.add_argument('--set', action='append', default=[], help='extra config override for every arm')
  ap.add_argument('--recipe', default=proxy.RECIPE,
                  help='the config every arm runs (default: the proxy; car_ads: the production recipe)')
  args = ap.parse_args()
  data, out = os.path.abspath(args.data), os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  splits = config_lib.load(args.recipe).ingest.splits
  noisy_csv = os.path.join(out, 'noisy', 'cars.csv')
  wrong_path = os.path.join(out, 'noisy', 'wrong.json')
  if not os.path.exists(wrong_path):
    wrong = write_export(os.path.join(data, 'cars.csv'), noisy_csv, args.rate, args.seed, splits)
    with open(wrong_path, 'w', encoding='utf-8') as f:
      json.dump({'rate': args.rate, 'seed': args.seed, 'ads': wrong}, f, indent=1)
  with open(wrong_path, encoding='utf-8') as f:
    wrong = json.load(f)['ads']
  for arm in args.arms.split(','):
    result_path = os.path.join(out, f'{arm}.result.json')
    if os.path.exists(result_path):
      with open(result_path, encoding='utf-8') as f:
        print(f.read().strip())
      continue
    clean = arm.startswith('clean') or arm == 'oracle_drop'
    csv_path = os.path.join(data, 'cars.csv') if clean else noisy_csv
    if arm == 'oracle_drop':
      csv_path = os.path.join(out, 'oracle', 'cars.csv')
      write_without(os.path.join(data, 'cars.csv'), csv_path, set(wrong))
    drop = arm in ('noisy_drop', 'noisy_early', 'noisy_cross_fit')
    share = (args.rate if args.small_loss is None else args.small_loss) if arm.endswith(
        '_small_loss') else 0.0
    sets = [f'model.drop_label_issues={"true" if drop else "false"}',
            f'model.label_audit_epoch={args.audit_epoch if arm == "noisy_early" else 0}',
            f'model.label_audit_folds={args.folds if arm == "noisy_cross_fit" else 0}',
            f'model.label_audit_share={args.audit_share if drop else 0.0}',
            f'model.label_audit_relabel={args.relabel if drop else 0.0}',
            f'model.drop_high_loss={share}',
            f'model.early_learning={args.early_learning if arm.endswith("_early_learning") else 0.0}',
            f'model.early_learning_momentum={args.early_learning_momentum}', *args.set]
    s = proxy.run_arm(arm, sets, out, csv_path, os.path.join(data, 'images'), args.recipe)
    record = proxy.training_record(os.path.join(out, arm))
    result = {'arm': arm, 'rate': 0.0 if clean else args.rate, 'seed': args.seed,
              'wrong_train_ads': 0 if clean else len(wrong), 'drop_high_loss': share,
              'early_learning': record['history']['stages'].get('early_learning'),
              **({'dropped_ads': len(wrong)} if arm == 'oracle_drop' else {}), 'summary': s,
              **proxy.validation_figures(record)}
    issues = record['history']['stages'].get('label_issues')
    if issues:
      ads = {str(a) for a in issues['ads']}
      hit = len(ads & set(wrong))
      result['flagged'] = {'ads': len(ads), 'train_ads': issues['train_ads'], 'truly_wrong': hit,
                           'recall': hit / max(1, len(wrong)), 'precision': hit / max(1, len(ads)),
                           'by': issues.get('by', 'out-of-fold linear probes'),
                           'count': issues.get('count', "cleanlab's estimate")}
      moved = {str(ad): c for ad, c in issues.get('relabelled', [])}
      if moved:
        vocab = class_vocabulary(os.path.join(out, arm))
        result['flagged']['relabelled'] = {  # a right ad relabelled is always made wrong
            'ads': len(moved), 'truly_wrong': len(set(moved) & set(wrong)),
            'to_the_true_class': sum(ad in wrong and vocab[c] == wrong[ad][1]
                                     for ad, c in moved.items())}
    with open(result_path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
    os.replace(result_path + '.tmp', result_path)
    print(json.dumps(result))


if __name__ == '__main__':
  main()

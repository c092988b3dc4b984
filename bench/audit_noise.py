"""The label audit measured like a product: wrong labels injected into the ads of one split,
ranked by each scoring method, scored against the truth kept beside them.

  scripts/env.sh run 'python bench/audit_noise.py --data ../shared/data/car_ads --split validation'

Every usable photo of the split's ads (the pipeline's split by ad_id) is scored once by the
model (cached in --cache). Then, per seed, a share `--rate` of the ads gets another
catalogued make|model|submodel — a sibling submodel (same make and model: often a year or a
body), another model of the same make, or another make, a third each where the catalogue
has one — and every method ranks the ads. Prints one JSON line per method: precision at
k (k = the number of wrong ads), recall at 90 % precision, average precision, AUROC, and the
share of each kind of mistake found in the top k (means over seeds). Choose on validation,
report on test (the model trained on neither).
"""
import argparse
import collections
import csv
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from carvision.components import audit, evaluation, names, serving  # noqa: E402
from carvision.components.example_gen import records  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402

KIND_OF_NOISE = ('sibling_submodel', 'same_make_other_model', 'other_make')


def catalogue(rows):
  """make -> model -> submodels, from the data set's classes."""
  tree = collections.defaultdict(lambda: collections.defaultdict(set))
  for r in rows:
    tree[r['make']][r['model']].add(r['submodel'])
  return tree


def inject(ads, tree, rate, rng):
  """{ad_id: listed class} with `rate` of the ads rewritten; {ad_id: kind} of the rewritten."""
  listed, wrong = dict(ads), {}
  for ad in rng.sample(sorted(ads), int(round(rate * len(ads)))):
    make, model, sub = names.split_label(ads[ad])
    options = {
        'sibling_submodel': [(make, model, s) for s in sorted(tree[make][model]) if s != sub],
        'same_make_other_model': [(make, m, s) for m in sorted(tree[make]) if m != model
                                  for s in sorted(tree[make][m])],
        'other_make': [(mk, m, s) for mk in sorted(tree) if mk != make for m in sorted(tree[mk])
                       for s in sorted(tree[mk][m])]}
    kinds = [k for k in KIND_OF_NOISE if options[k]]
    kind = rng.choice(kinds)
    listed[ad] = names.CLASS_SEP.join(rng.choice(options[kind]))
    wrong[ad] = kind
  return listed, wrong


def measure(scores, is_wrong, kinds):
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  order = np.argsort(-scores, kind='stable')
  k = int(is_wrong.sum())
  top = order[:k]
  precision, recall, _ = metrics.precision_recall_curve(is_wrong, scores)
  at90 = float(recall[precision >= 0.9].max()) if (precision >= 0.9).any() else 0.0
  per_kind = {}
  for kind in KIND_OF_NOISE:
    members = np.array([kk == kind for kk in kinds])
    if members.any():
      per_kind[kind] = float(np.isin(np.flatnonzero(members), top).mean())
  return {'precision_at_k': float(is_wrong[top].mean()), 'recall_at_90_precision': at90,
          'average_precision': float(metrics.average_precision_score(is_wrong, scores)),
          'auroc': float(metrics.roc_auc_score(is_wrong, scores)), 'found_in_top_k': per_kind,
          'k': k}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--data', required=True)
  ap.add_argument('--model', default=os.path.join(config_lib.REPO_ROOT, 'models', 'car_ads'))
  ap.add_argument('--config', default='car_ads')
  ap.add_argument('--split', default='validation', choices=['validation', 'test'])
  ap.add_argument('--rate', type=float, default=0.10)
  ap.add_argument('--seeds', type=int, default=10)
  ap.add_argument('--cache', help='photo probabilities (.npz), reused when present')
  args = ap.parse_args()
  cfg = config_lib.load(args.config)
  rows = [r for r in csv.DictReader(open(os.path.join(args.data, 'labels.csv'), encoding='utf-8'))
          if r['is_car'] == 'true' and r['file_ok'] == 'true'
          and records.split_for(int(r['ad_id']), cfg.ingest.splits) == args.split]
  model = serving.load(args.model, 'tflite')
  cache = args.cache or os.path.join(config_lib.REPO_ROOT, 'runs', 'bench',
                                     f'audit_{args.split}_{os.path.basename(args.model.rstrip("/"))}.npz')
  if os.path.exists(cache):
    saved = np.load(cache, allow_pickle=False)
    probs = dict(zip(saved['p_hash'].tolist(), saved['probs']))
  else:
    p, usable, _ = evaluation.predict_folder(model, args.data, rows, cfg.ingest.max_pixels,
                                             progress=True)
    probs = {r['p_hash']: p[i] for i, r in enumerate(usable)}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, p_hash=np.array(list(probs)), probs=np.stack(list(probs.values())))
  truth, photos = {}, collections.defaultdict(list)
  for r in rows:
    if r['p_hash'] in probs and r['p_hash'] not in photos[int(r['ad_id'])]:
      truth[int(r['ad_id'])] = evaluation.truth(r)
      photos[int(r['ad_id'])].append(r['p_hash'])
  known = set(model.labels)
  truth = {a: t for a, t in truth.items() if t in known}
  tree = catalogue([dict(zip(('make', 'model', 'submodel'), names.split_label(l))) for l in model.labels])
  results = collections.defaultdict(list)
  for seed in range(args.seeds):
    listed, wrong = inject(truth, tree, args.rate, random.Random(seed))
    ads = {a: {'listed': listed[a], 'p_hashes': photos[a]} for a in truth}
    for method in audit.METHODS:
      verdicts = [v for v in audit.judge(ads, probs, model.labels, method) if v.score is not None]
      scores = np.array([v.score for v in verdicts])
      is_wrong = np.array([v.ad_id in wrong for v in verdicts])
      results[method].append(measure(scores, is_wrong, [wrong.get(v.ad_id) for v in verdicts]))
  for method, runs in results.items():
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != 'found_in_top_k'}
    mean['found_in_top_k'] = {kind: float(np.nanmean([r['found_in_top_k'].get(kind, np.nan) for r in runs]))
                              for kind in KIND_OF_NOISE}
    print(json.dumps({'method': method, 'split': args.split, 'ads': len(truth),
                      'rate': args.rate, 'seeds': args.seeds, 'model': args.model,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in mean.items()}}))


if __name__ == '__main__':
  main()

"""A model scored on a labelled photo folder (labels.csv + images/<p_hash>.jpg): what
`carvision evaluate` computes, outside the command line. No TensorFlow: a TFLite model
needs LiteRT, Pillow and NumPy only."""
from __future__ import annotations

import collections
import csv
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from carvision.components import features as F
from carvision.components import images
from carvision.components import names
from carvision.components import scoring
from carvision.components import serving
from carvision.components.errors import UserError

COLUMNS = (F.AD_ID, F.P_HASH)  # and either `class` or make, model, submodel
BATCH = 16


def read_labels(data_dir: str) -> List[Dict[str, str]]:
  """The rows of <data_dir>/labels.csv, after checking the directory, the header and that
  there is at least one row: a bad file fails before any photo is scored."""
  path = os.path.join(data_dir, 'labels.csv')
  if not os.path.isdir(data_dir):
    raise UserError(f'--data {data_dir}: no such directory')
  if not os.path.isfile(path):
    raise UserError(f'--data {data_dir}: no labels.csv (columns ad_id, p_hash, '
                    'make, model, submodel or class; photos in images/<p_hash>.jpg)')
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    reader = csv.DictReader(f)
    cols = set(reader.fieldnames or [])
    missing = [c for c in COLUMNS if c not in cols]
    if 'class' not in cols:
      missing += [c for c in ('make', 'model', 'submodel') if c not in cols]
    if missing:
      raise UserError(f'{path}: missing columns {missing} (has {sorted(cols)})')
    rows = list(reader)
  if not rows:
    raise UserError(f'{path}: no rows')
  for i, r in enumerate(rows, 2):
    if not str(r.get(F.AD_ID) or '').strip().lstrip('-').isdigit():
      raise UserError(f'{path}:{i}: ad_id {r.get(F.AD_ID)!r} is not an integer')
  return rows


def in_split(rows: Sequence[Dict[str, str]], split: str, splits: Dict[str, int]) -> List[Dict]:
  """The rows whose ad the pipeline's split (hash of ad_id, `ingest.splits`) puts in `split`
  ('all': every row)."""
  from carvision.components.example_gen import records  # pylint: disable=g-import-not-at-top
  if split == 'all':
    return list(rows)
  return [r for r in rows if records.split_for(int(r[F.AD_ID]), splits) == split]


def unseen(rows: Sequence[Dict[str, str]], seen: Optional[Dict[str, set]]
           ) -> Tuple[List[Dict[str, str]], int]:
  """(the rows of ads the model neither trained on nor was chosen on, how many were left
  out): `seen` is the model's seen_ads.json (None: the model does not say, nothing left out)."""
  if not seen:
    return list(rows), 0
  ads = serving.all_seen(seen)
  kept = [r for r in rows if int(r[F.AD_ID]) not in ads]
  return kept, len(rows) - len(kept)


def truth(row: Dict[str, str]) -> str:
  if 'class' in row:
    return row['class']
  return names.CLASS_SEP.join((row['make'], row['model'], row['submodel']))


def predict_folder(model, data_dir: str, rows: Sequence[Dict[str, str]], max_pixels: int,
                   limit: Optional[int] = None, progress: bool = False
                   ) -> Tuple[np.ndarray, List[Dict[str, str]], Dict[str, int]]:
  """(probabilities, the rows scored, left-out counts by reason): each usable photo decoded
  once (the model contract, components/images.py) and scored in batches; a row marked
  is_car=false, a missing file or a photo that cannot be used is counted, not scored."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  usable, skipped, probs, batch = [], {}, [], []
  for r in tqdm(rows, desc='evaluate', unit='photo', disable=not progress):
    if limit and len(usable) >= limit:
      break
    reason = None
    path = os.path.join(data_dir, 'images', r[F.P_HASH] + '.jpg')
    if r.get('is_car', 'true') != 'true':
      reason = 'non_car'
    elif not os.path.exists(path):
      reason = 'missing_file'
    else:
      with open(path, 'rb') as f:
        try:
          batch.append(images.contract_pixels(f.read(), model.size, max_pixels))
        except images.PhotoError as e:
          reason = e.reason
    if reason:
      skipped[reason] = skipped.get(reason, 0) + 1
      continue
    usable.append(r)
    if len(batch) == BATCH:
      probs.append(model.predict_pixels(np.stack(batch)))
      batch = []
  if batch:
    probs.append(model.predict_pixels(np.stack(batch)))
  out = np.concatenate(probs) if probs else np.zeros((0, len(model.labels)))
  return out, usable, skipped


def metrics_of(probs: np.ndarray, labels: List[str], rows: Sequence[Dict[str, str]],
               skipped: Dict[str, int], answers: Optional[Dict] = None) -> Dict[str, Any]:
  """scoring.score per photo and per ad, the left-out counts and the classes the model does
  not know (`unknown_class_names`; counted wrong)."""
  truths = [truth(r) for r in rows]
  m = scoring.score(probs, labels, truths, groups=[r[F.AD_ID] for r in rows], answers=answers)
  m['skipped'] = skipped
  known = set(labels)
  unknown = collections.Counter(t for t in truths if t not in known)
  m['unknown_class_names'] = sorted(unknown)
  m['unknown_class_photos'] = dict(sorted(unknown.items()))
  if unknown:  # the photos of classes the model knows, scored apart (unknown ones cannot be right)
    keep = [i for i, t in enumerate(truths) if t in known]
    k = scoring.score(probs[keep], labels, [truths[i] for i in keep]) if keep else {}
    m['known_classes'] = {key: k.get(key) for key in ('examples', 'top1_accuracy',
                                                      'top5_accuracy', 'make_accuracy')}
  return m

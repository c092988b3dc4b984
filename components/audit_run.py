"""`carvision audit` outside the command line: ads read as ingestion reads them, photos
fetched as ingestion fetches them, scored by a pushed TFLite model, judged (components/audit)
and written as CSV, JSON and an HTML page a reviewer works through."""
from __future__ import annotations

import base64
import collections
import csv
import html
import io
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Set

import numpy as np

from carvision.components import audit, images
from carvision.components.errors import SourceError
from carvision.components.example_gen import records

BATCH = 32


def ads_from_rows(rows: Iterable[records.Row], keep: Optional[Set[int]] = None) -> Dict[int, Dict]:
  """ad_id -> {'listed', 'p_hashes' (usable rows, each once), 'reasons' (p_hash -> why not),
  'label_reason'}; rows without an ad id are left out (they belong to no listing)."""
  ads: Dict[int, Dict] = {}
  for row in rows:
    if row.ad_id is None or (keep is not None and int(row.ad_id) not in keep):
      continue
    ad = ads.setdefault(int(row.ad_id), {'listed': '', 'p_hashes': [], 'reasons': {},
                                          'label_reason': None})
    if row.make and row.model and row.submodel and not ad['listed']:
      ad['listed'] = row.label
    letter = None if row.reason else records.check_label(row)
    bad = row.reason or (letter.reason if letter else None)
    if row.reason in (records.MISSING_LABEL, records.PAIR_NOT_IN_CATALOG) or letter:
      ad['label_reason'] = f'{bad}: {row.detail or (letter.detail if letter else "")}'
    if bad:
      ad['reasons'][row.p_hash] = bad
    elif row.p_hash not in ad['p_hashes']:
      ad['p_hashes'].append(row.p_hash)
  for ad in ads.values():
    if ad['label_reason'] and not ad['p_hashes']:
      ad['listed'] = ''
  return ads


def score_photos(model, fetcher, p_hashes: Sequence[str], max_pixels: int, progress: bool = True
                 ) -> (Dict[str, np.ndarray], Dict[str, str], Dict[str, bytes]):
  """(p_hash -> class probabilities, p_hash -> reason it could not be scored, p_hash -> the
  photo's bytes (kept for the report's thumbnails))."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  probs, failed, photos = {}, {}, {}
  bar = tqdm(total=len(p_hashes), desc='audit', unit='photo', disable=not progress)
  for i in range(0, len(p_hashes), BATCH):
    chunk = list(p_hashes[i:i + BATCH])
    batch, names = [], []
    for h, (data, reason, _) in zip(chunk, fetcher.fetch_many(chunk)):
      if reason is None:
        try:
          batch.append(images.contract_pixels(data, model.size, max_pixels))
          names.append(h)
          photos[h] = data
        except images.PhotoError as e:
          reason = e.reason
      if reason is not None:
        failed[h] = reason
    if batch:
      for h, p in zip(names, model.predict_pixels(np.stack(batch))):
        probs[h] = p
    bar.update(len(chunk))
  bar.close()
  return probs, failed, photos


def run(model, rows: Iterable[records.Row], fetcher, max_pixels: int,
        keep: Optional[Set[int]] = None, progress: bool = True):
  """(ranked verdicts, the photos' bytes)."""
  ads = ads_from_rows(rows, keep)
  if not ads:
    raise SourceError('audit: no ads to audit in the source (an empty database, or no ad '
                      'in the chosen span / dates / split)')
  wanted = sorted({h for ad in ads.values() for h in ad['p_hashes']})
  probs, failed, photos = score_photos(model, fetcher, wanted, max_pixels, progress)
  for ad in ads.values():
    for h in ad['p_hashes']:
      if h in failed:
        ad['reasons'][h] = failed[h]
  return audit.judge(ads, probs, model.labels), photos


COLUMNS = ('ad_id', 'score', 'kind', 'listed_make', 'listed_model', 'listed_submodel',
           'listed_probability', 'photos_say_make', 'photos_say_model', 'photos_say_submodel',
           'photos_say_probability', 'photos_say_make_only', 'make_probability',
           'listed_make_probability', 'photos', 'reason', 'p_hashes')


def write_csv(path: str, verdicts: List[audit.AdVerdict]) -> None:
  tmp = path + '.partial'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for v in verdicts:
      w.writerow(v.row())
  os.replace(tmp, path)


def write_json(path: str, verdicts: List[audit.AdVerdict]) -> None:
  tmp = path + '.partial'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump([v.row() for v in verdicts], f, ensure_ascii=False, indent=1)
  os.replace(tmp, path)


def _thumb(data: bytes, side: int = 160) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(images.open_rgb(data, 40_000_000))
  img.thumbnail((side, side))
  buf = io.BytesIO()
  img.save(buf, 'JPEG', quality=80)
  return 'data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode()


def write_html(path: str, verdicts: List[audit.AdVerdict], photos: Dict[str, bytes],
               top: int = 100, title: str = 'carvision audit') -> None:
  """The worst-ranked ads, their photos beside what was listed and what the photos say."""
  e = html.escape
  counts = collections.Counter(v.kind or 'not judged' for v in verdicts)
  parts = [f'<!doctype html><meta charset="utf-8"><title>{e(title)}</title>',
           '<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}'
           'td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}'
           'img{height:96px;margin-right:4px}.k{font-weight:bold}</style>',
           f'<h1>{e(title)}</h1><p>{len(verdicts)} ads: '
           + ', '.join(f'{e(k)} {n}' for k, n in counts.most_common())
           + f'. The {min(top, len(verdicts))} most likely mislabelled first (score = 1 - the '
             'label quality of the listed class on the photos combined).</p>',
           '<table><tr><th>#</th><th>ad</th><th>score</th><th>photos</th><th>listed</th>'
           '<th>the photos say</th><th>kind</th></tr>']
  for i, v in enumerate(verdicts[:top], 1):
    r = v.row()
    imgs = ''.join(f'<img src="{_thumb(photos[h])}" alt="{e(h)}">' for h in v.p_hashes[:4]
                   if h in photos)
    said = (f"{e(r['photos_say_make'])} {e(r['photos_say_model'])} {e(r['photos_say_submodel'])}"
            f" ({r['photos_say_probability']:.2f})<br>make {e(r['photos_say_make_only'])} "
            f"({r['make_probability']:.2f})") if v.predicted else ''
    parts.append(
        f"<tr><td>{i}</td><td>{v.ad_id}</td><td>{'' if v.score is None else f'{v.score:.3f}'}</td>"
        f"<td>{imgs}</td><td>{e(r['listed_make'])} {e(r['listed_model'])} "
        f"{e(r['listed_submodel'])}</td><td>{said}</td>"
        f"<td class=k>{e(v.kind or '')}{'<br>' + e(v.reason) if v.reason else ''}</td></tr>")
  parts.append('</table>')
  tmp = path + '.partial'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(parts))
  os.replace(tmp, path)

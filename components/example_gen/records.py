"""Rows, dead letters and tf.Examples: the plain-Python core of ingestion.

A *row* is one photo of one ad as the source gives it (one app.ad_images row, or
one p_hash of a cars.csv `hashish`). Every row ends as exactly one example or one
dead letter with a reason, so `rows == examples + dead letters` always holds.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from carvision.components import features as F
from carvision.components import names

# Dead-letter reasons (also the Beam counter names, prefixed `dead_letter_`).
HTTP_404 = 'http_404'
HTTP_4XX = 'http_4xx'
HTTP_5XX = 'http_5xx'
TIMEOUT = 'timeout'
CONNECTION = 'connection_error'
NOT_JPEG = 'not_jpeg'
CORRUPT_JPEG = 'corrupt_jpeg'
TOO_LARGE = 'too_large'
EMPTY = 'empty'
NON_CAR = 'non_car'
MISSING_LABEL = 'missing_label'
PAIR_NOT_IN_CATALOG = 'pair_not_in_catalog'
DUPLICATE = 'duplicate'
BAD_P_HASH = 'bad_p_hash'
BAD_ROW = 'bad_row'
MISSING_FILE = 'missing_file'
P_HASH_MISMATCH = 'p_hash_mismatch'

JPEG_MAGIC = b'\xff\xd8\xff'
CLASS_SEP = names.CLASS_SEP


@dataclasses.dataclass
class Row:
  ad_id: Optional[int]
  p_hash: str
  position: int = 0
  make: Optional[str] = None
  model: Optional[str] = None
  submodel: Optional[str] = None
  # Pixel bbox [x1, y1, x2, y2] of the largest accepted detection, when known.
  bbox: Optional[List[float]] = None
  confidence: Optional[float] = None
  # Set by the source when the row is already known to be unusable.
  reason: Optional[str] = None
  detail: str = ''

  @property
  def label(self) -> str:
    return CLASS_SEP.join([self.make or '', self.model or '', self.submodel or ''])


@dataclasses.dataclass
class DeadLetter:
  ad_id: Optional[int]
  p_hash: str
  reason: str
  detail: str = ''

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def dead(row: Row, reason: str, detail: str = '') -> DeadLetter:
  return DeadLetter(ad_id=row.ad_id, p_hash=row.p_hash, reason=reason, detail=detail[:300])


def largest_detection(detections: Any, classes: Sequence[str], min_confidence: float
                      ) -> Tuple[bool, Optional[List[float]], Optional[float]]:
  """(has an accepted vehicle detection, its pixel bbox, its confidence).

  `detections` is the yolo_classification jsonb: a list of
  {class_name, confidence, bbox: [x1, y1, x2, y2]}; anything else counts as none.
  """
  if isinstance(detections, str):
    try:
      detections = json.loads(detections)
    except ValueError:
      return False, None, None
  best, best_area, best_conf = None, -1.0, None
  found = False
  for d in detections if isinstance(detections, list) else []:
    if not isinstance(d, dict) or d.get('class_name') not in classes:
      continue
    conf = d.get('confidence')
    try:
      conf = None if conf is None else float(conf)
    except (TypeError, ValueError):
      continue  # a confidence that is not a number accepts nothing
    if conf is not None and conf < min_confidence:
      continue
    found = True
    box = d.get('bbox')
    if isinstance(box, list) and len(box) == 4:
      try:
        x1, y1, x2, y2 = (float(v) for v in box)
      except (TypeError, ValueError):
        continue
      area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
      if area > best_area:
        best, best_area, best_conf = [x1, y1, x2, y2], area, conf
  return found, best, (float(best_conf) if best_conf is not None else None)


def check_label(row: Row) -> Optional[DeadLetter]:
  """Rows without a full make/model/submodel cannot be training labels."""
  for name in ('make', 'model', 'submodel'):
    v = getattr(row, name)
    if v is None or not str(v).strip():
      return dead(row, MISSING_LABEL, f'{name} is empty')
    if CLASS_SEP in str(v):
      return dead(row, MISSING_LABEL, f'{name} contains {CLASS_SEP!r}')
  return None


def check_p_hash(row: Row, pattern: str) -> Optional[DeadLetter]:
  """A p_hash becomes a URL or path: only the configured shape is accepted."""
  if not isinstance(row.p_hash, str) or not re.fullmatch(pattern, row.p_hash):
    return dead(row, BAD_P_HASH, f'p_hash {str(row.p_hash)[:40]!r} does not match {pattern}')
  return None


def split_for(ad_id: int, splits: Dict[str, int]) -> str:
  """A stable split by ad_id (sha256, not Python's salted hash), so an ad never crosses splits.

  Split names are taken in sorted order, so the same config gives the same split however
  the mapping was ordered (YAML, JSON with sorted keys, the CLI).
  """
  total = sum(splits.values())
  bucket = int(hashlib.sha256(str(int(ad_id)).encode()).hexdigest()[:8], 16) % total
  for name, weight in sorted(splits.items()):
    if bucket < weight:
      return name
    bucket -= weight
  raise AssertionError('unreachable')


def validate_image(data: bytes, max_pixels: int) -> Tuple[Optional[str], str, int, int]:
  """(reason or None, detail, width, height): JPEG by magic bytes, sane size, fully decodable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not data:
    return EMPTY, 'zero-byte body', 0, 0
  if not data.startswith(JPEG_MAGIC):
    from carvision.components import images  # pylint: disable=g-import-not-at-top
    return NOT_JPEG, f'content starts with {data[:8]!r} ({images.sniff(data)})', 0, 0
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if img.format != 'JPEG':
        return NOT_JPEG, f'decoder says {img.format}', width, height
      if width * height > max_pixels:
        return TOO_LARGE, f'{width}x{height} > {max_pixels} pixels', width, height
      if width == 0 or height == 0:
        return EMPTY, f'{width}x{height}', width, height
      img.load()  # full decode: truncated/corrupt data raises here
  except Image.DecompressionBombError as e:
    return TOO_LARGE, str(e), 0, 0
  except Exception as e:  # pylint: disable=broad-except
    return CORRUPT_JPEG, f'{type(e).__name__}: {e}', 0, 0
  return None, '', width, height


def check_photo_matches(data: bytes, p_hash: str, max_distance: Optional[int]
                        ) -> Tuple[Optional[str], str]:
  """(P_HASH_MISMATCH or None, detail): the photo's perceptual hash (imagehash.phash of the
  photo as decoded, the definition of app.ad_images.p_hash) within `max_distance` bits of
  its name; a host that serves another photo under this name is caught here."""
  if max_distance is None:
    return None, ''
  import imagehash  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    got = imagehash.phash(img)
  distance = got - imagehash.hex_to_hash(p_hash)
  if distance > max_distance:
    return P_HASH_MISMATCH, (f'the photo served hashes to {got} ({distance} of 64 bits from '
                             f'its name; at most {max_distance} allowed)')
  return None, ''


def to_example(row: Row, data: bytes, width: int, height: int):
  """The tf.Example: the JPEG bytes as fetched (never re-encoded), labels, ids, bbox."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def b(v: Iterable[bytes]):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(v)))

  def i(v: Iterable[int]):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

  def f(v: Iterable[float]):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))

  # Normalised bbox of the largest car detection; the whole photo when unknown.
  x1, y1, x2, y2 = 0.0, 0.0, 1.0, 1.0
  known = 0
  if row.bbox and width and height:
    bx1, by1, bx2, by2 = row.bbox
    x1, x2 = sorted((min(max(bx1 / width, 0.0), 1.0), min(max(bx2 / width, 0.0), 1.0)))
    y1, y2 = sorted((min(max(by1 / height, 0.0), 1.0), min(max(by2 / height, 0.0), 1.0)))
    known = 1 if (x2 > x1 and y2 > y1) else 0
    if not known:
      x1, y1, x2, y2 = 0.0, 0.0, 1.0, 1.0
  ymin, xmin, ymax, xmax = F.BBOX
  feats = {
      F.IMAGE: b([data]),
      F.FORMAT: b([b'jpeg']),
      F.HEIGHT: i([height]),
      F.WIDTH: i([width]),
      xmin: f([x1]),
      ymin: f([y1]),
      xmax: f([x2]),
      ymax: f([y2]),
      F.BBOX_KNOWN: i([known]),
      **{F.raw_label(k): b([v.encode()]) for k, v in (
          ('make', row.make), ('model', row.model), ('submodel', row.submodel),
          ('class', row.label))},
      F.AD_ID: i([int(row.ad_id)]),
      F.P_HASH: b([row.p_hash.encode()]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats))


CSV_HEADER = ('ad_id', 'make', 'model', 'submodel', 'hashish')


def _bad(detail: str, ad_id: Optional[int] = None) -> Row:
  return Row(ad_id=ad_id, p_hash='', reason=BAD_ROW, detail=detail)


def rows_from_csv_fields(fields: Sequence[str], where: str) -> List[Row]:
  """One cars.csv record (`ad_id,make,model,submodel,hashish`) -> one Row per p_hash.

  A malformed record still yields one row (reason `bad_row`, `where` = file:line) so it
  is counted.
  """
  if len(fields) != len(CSV_HEADER):
    return [_bad(f'{where}: {len(fields)} fields, expected {len(CSV_HEADER)}')]
  ad_raw, make, model, submodel, hashish = fields
  try:
    ad_id = int(ad_raw)
  except ValueError:
    return [_bad(f'{where}: ad_id {ad_raw!r}')]
  hashes = [h.strip() for h in hashish.split(',')] if hashish.strip() else []
  if not hashes:
    return [_bad(f'{where}: no p_hash', ad_id)]
  return [Row(ad_id=ad_id, p_hash=h, position=pos, make=make or None, model=model or None,
              submodel=submodel or None) for pos, h in enumerate(hashes)]


_SWALLOWED = re.compile(r'[\r\n]\s*\d+\s*,')  # a line inside a field that starts like a record


def _one_line(text: str, delimiter: str = ',') -> Any:
  """One physical line as a CSV record (its fields), or what is wrong with it (a str)."""
  body = text.rstrip('\r\n')
  try:
    fields = next(csv.reader([body], strict=True, delimiter=delimiter), [])
  except csv.Error as e:
    if str(e) == 'unexpected end of data':
      return 'unbalanced quote (a field opened with " is never closed)'
    return str(e)
  return fields


def sniff_delimiter(first_line: str) -> str:
  """',' (psql --csv) unless the first record reads as the five columns with ';' (the
  export of a spreadsheet in a locale whose decimal mark is the comma)."""
  if len(_one_line(first_line, ',') or []) == len(CSV_HEADER):
    return ','
  semi = _one_line(first_line, ';')
  return ';' if isinstance(semi, list) and len(semi) == len(CSV_HEADER) else ','


def rows_from_csv(data: bytes, source: str) -> Iterator[Row]:
  """Every record of one cars.csv file, parsed as CSV (quoted fields may hold newlines).

  The header is recognised, not assumed: a file without one keeps its first record. A
  record with bytes that are not UTF-8 is one `bad_row`, not a failed ingest. Details
  name the file and the record's first line.
  """
  text = data.decode('utf-8', 'surrogateescape')
  if text.startswith('\ufeff'):
    text = text[1:]  # a UTF-8 byte-order mark (spreadsheet exports)
  physical = io.StringIO(text, newline='').readlines()  # the lines as the reader splits them
  delimiter = sniff_delimiter(next((l for l in physical if l.strip()), ''))
  reader = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter)
  line, first = 0, True
  pending: List[Tuple[int, List[str]]] = []
  while True:
    if pending:
      start, fields = pending.pop(0)
    else:
      start = line + 1
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        line = reader.line_num
        yield _bad(f'{source}:{start}: {e}')
        continue
      line = reader.line_num
      if line > start and (len(fields) != len(CSV_HEADER)
                           or any(_SWALLOWED.search(f) for f in fields)):
        # A quote left open swallowed the lines up to the next quote (a record of the wrong
        # width, or a field holding a line that starts like a record): each of those lines
        # is read on its own, so one stray quote costs one row, not every row it swallowed.
        # A quoted line break inside one value stays one record.
        pending = [(n, _one_line(physical[n - 1], delimiter)) for n in range(start, line + 1)]
        continue
    if isinstance(fields, str):
      yield _bad(f'{source}:{start}: {fields}')
      continue
    if not any(f.strip() for f in fields):
      continue  # a blank line is no row
    where = f'{source}:{start}'
    if first:
      first = False
      if tuple(f.strip().lower() for f in fields) == CSV_HEADER:
        continue
      if not fields[0].strip().isdigit():
        yield _bad(f'{where}: header {fields!r} is not {",".join(CSV_HEADER)}')
        continue
    if any('\udc80' <= ch <= '\udcff' for f in fields for ch in f):
      yield _bad(f'{where}: not UTF-8')
      continue
    yield from rows_from_csv_fields(fields, where)

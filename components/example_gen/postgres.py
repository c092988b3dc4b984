"""Reading the marketplace database: one Row per app.ad_images row.

This is the export query's semantics made accountable: instead of inner joins that
silently drop rows, LEFT JOINs keep every photo and say why it cannot be used
(non-car photo, missing label, (model, submodel) pair not in the catalogue).
Reads are split into ad_id ranges, each read with a server-side cursor, so Beam
workers (Dataflow's included) share the work; rows whose ad_id is NULL (in no range)
are read by a partition of their own and become `bad_row` dead letters. The rows
are counted once at the source (`plan_reads`), independently of what the reads yield,
and ingestion fails when the two disagree. The password comes from PGPASSWORD.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from carvision.components.errors import SourceError
from carvision.components.example_gen import records

_ROWS_SQL = """
SELECT i.ad_id, i.p_hash, i.position, i.yolo_classification,
       (a.id IS NOT NULL) AS ad_exists,
       ma.name AS make, mo.name AS model, sm.name AS submodel,
       a.submodel_id IS NOT NULL AND a.model_id IS NOT NULL AS has_ids,
       (ms.model_id IS NOT NULL) AS pair_in_catalog
FROM app.ad_images i
LEFT JOIN app.ads a ON a.id = i.ad_id
LEFT JOIN static.makes ma ON ma.id = a.make_id
LEFT JOIN static.models mo ON mo.id = a.model_id
LEFT JOIN static.submodels sm ON sm.id = a.submodel_id
LEFT JOIN static.models_submodels ms
       ON ms.model_id = a.model_id AND ms.submodel_id = a.submodel_id
WHERE {where} AND i.id <= %(max_id)s
ORDER BY i.ad_id, i.position, i.id
"""
_IN_RANGE = 'i.ad_id >= %(lo)s AND i.ad_id < %(hi)s'
_NULL_AD = 'i.ad_id IS NULL'

# Rows at the start of the read; later inserts (id above max_id) wait for the next run.
_BOUNDS_SQL = ('SELECT min(ad_id), max(ad_id), count(*), max(id), '
               'count(*) FILTER (WHERE ad_id IS NULL) FROM app.ad_images')


def password_from_secret(secret: str) -> str:
  """The database password from Secret Manager (workers on Dataflow/Vertex); never logged."""
  from google.cloud import secretmanager  # pylint: disable=g-import-not-at-top
  client = secretmanager.SecretManagerServiceClient()
  return client.access_secret_version(name=secret).payload.data.decode('utf-8')


@contextlib.contextmanager
def database_errors():
  """psycopg2's errors as SourceError (one line, the settings to check), also inside Beam
  workers, whose errors reach the command line as text."""
  import psycopg2  # pylint: disable=g-import-not-at-top
  try:
    yield
  except psycopg2.Error as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise SourceError(f'database: {first} (check ingest.dsn / --dsn / CARVISION_DSN, '
                      'PGPASSWORD, and that the server is up)') from None


def connect(dsn: str, password_secret: Optional[str] = None):
  """libpq reads PGPASSWORD itself; otherwise the configured Secret Manager version."""
  import psycopg2  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if password_secret and not os.environ.get('PGPASSWORD'):
    kwargs['password'] = password_from_secret(password_secret)
  return psycopg2.connect(dsn, connect_timeout=10, application_name='carvision', **kwargs)


def check_source(dsn: str, password_secret: Optional[str] = None) -> None:
  """Connects and reads one row of app.ad_images: a wrong password, an unknown host or a
  missing table fails here, before any component runs, with libpq's own message."""
  with database_errors():
    with connect(dsn, password_secret) as conn, conn.cursor() as cur:
      cur.execute('SELECT 1 FROM app.ad_images LIMIT 1')
    conn.close()


def plan_reads(dsn: str, partitions: int, password_secret: Optional[str] = None) -> Dict[str, Any]:
  """{'ranges': half-open [lo, hi) ad_id ranges covering every row, plus (None, None) for
  rows with a NULL ad_id; 'rows': the table's row count; 'max_id': the last image id read}."""
  with database_errors():
    with connect(dsn, password_secret) as conn, conn.cursor() as cur:
      cur.execute(_BOUNDS_SQL)
      lo, hi, n, max_id, n_null = cur.fetchone()
    conn.close()
  ranges: List[Tuple[Optional[int], Optional[int]]] = []
  if lo is not None:
    parts = max(1, min(int(partitions), int(n)))
    step = max(1, -(-(hi + 1 - lo) // parts))
    ranges = [(a, min(a + step, hi + 1)) for a in range(lo, hi + 1, step)]
  if n_null:
    ranges.append((None, None))
  return {'ranges': ranges, 'rows': int(n or 0), 'max_id': int(max_id or 0)}


def row_from_record(rec: Sequence, classes: Sequence[str], min_confidence: float) -> records.Row:
  (ad_id, p_hash, position, yolo, ad_exists, make, model, submodel, has_ids,
   pair_in_catalog) = rec
  row = records.Row(ad_id=ad_id, p_hash=p_hash, position=position or 0,
                    make=make, model=model, submodel=submodel)
  if ad_id is None:
    row.reason, row.detail = records.BAD_ROW, 'app.ad_images.ad_id is NULL'
    return row
  is_vehicle, bbox, conf = records.largest_detection(yolo, classes, min_confidence)
  row.bbox, row.confidence = bbox, conf
  if not is_vehicle:
    row.reason, row.detail = records.NON_CAR, f'detections: {json.dumps(yolo)[:200]}'
  elif not ad_exists:
    row.reason, row.detail = records.MISSING_LABEL, 'ad not in app.ads'
  elif not has_ids or not (make and model and submodel):
    row.reason, row.detail = records.MISSING_LABEL, 'make/model/submodel is NULL'
  elif not pair_in_catalog:
    row.reason = records.PAIR_NOT_IN_CATALOG
    row.detail = f'({model!r}, {submodel!r}) not in static.models_submodels'
  return row


def read_range(dsn: str, lo: Optional[int], hi: Optional[int], classes: Sequence[str],
               min_confidence: float, max_id: int, itersize: int = 2000,
               password_secret: Optional[str] = None) -> Iterator[records.Row]:
  """Streams one ad_id range (lo None: the rows whose ad_id is NULL) through a named
  (server-side) cursor."""
  with database_errors():
    conn = connect(dsn, password_secret)
    try:
      with conn.cursor(name=f'carvision_{lo}_{hi}') as cur:
        cur.itersize = itersize
        where = _NULL_AD if lo is None else _IN_RANGE
        cur.execute(_ROWS_SQL.format(where=where), {'lo': lo, 'hi': hi, 'max_id': max_id})
        for rec in cur:
          yield row_from_record(rec, classes, min_confidence)
    finally:
      conn.close()


def ads_created_between(dsn: str, since: Optional[str], until: Optional[str],
                        password_secret: Optional[str] = None) -> set:
  """The ids of the ads created in [since, until) (either may be None)."""
  with database_errors():
    with connect(dsn, password_secret) as conn, conn.cursor() as cur:
      cur.execute('SELECT id FROM app.ads WHERE (%(since)s::timestamptz IS NULL OR created_at >= '
                  '%(since)s::timestamptz) AND (%(until)s::timestamptz IS NULL OR created_at < '
                  '%(until)s::timestamptz)', {'since': since, 'until': until})
      ids = {int(r[0]) for r in cur.fetchall()}
    conn.close()
  return ids


# The original export, without its duplicate-p_hash defect: distinct p_hashes per
# ad, ordered by photo position; vehicle classes and confidence are parameters.
EXPORT_SQL = """
WITH vehicle_images AS (
  SELECT i.ad_id, i.p_hash, min(i.position) AS position
  FROM app.ad_images i
  WHERE EXISTS (
    SELECT 1 FROM jsonb_array_elements(
        CASE WHEN jsonb_typeof(i.yolo_classification) = 'array'
             THEN i.yolo_classification ELSE '[]'::jsonb END) d
    WHERE d ->> 'class_name' = ANY(%(classes)s)
      AND coalesce((d ->> 'confidence')::float8, 1.0) >= %(min_conf)s)
  GROUP BY i.ad_id, i.p_hash
)
SELECT a.id, ma.name, mo.name, sm.name,
       string_agg(v.p_hash, ',' ORDER BY v.position, v.p_hash) AS hashish
FROM app.ads a
JOIN static.makes ma ON a.make_id = ma.id
JOIN static.models mo ON a.model_id = mo.id
JOIN static.submodels sm ON a.submodel_id = sm.id
JOIN static.models_submodels ms ON mo.id = ms.model_id AND ms.submodel_id = sm.id
JOIN vehicle_images v ON v.ad_id = a.id
GROUP BY a.id, ma.name, mo.name, sm.name
ORDER BY a.id
"""


def usable_photos(dsn: str, vehicle_classes, min_confidence: float,
                  password_secret: Optional[str] = None):
  """The rows ingestion turns into examples, once each: a vehicle photo of an ad with
  catalogue labels, its largest vehicle detection (bbox, confidence); a p_hash that the
  original query repeats (two car detections) comes once."""
  seen = set()
  plan = plan_reads(dsn, 1, password_secret)
  for lo, hi in plan['ranges']:
    for row in read_range(dsn, lo, hi, vehicle_classes, min_confidence, plan['max_id'],
                          password_secret=password_secret):
      if row.reason or (row.ad_id, row.p_hash) in seen:
        continue
      seen.add((row.ad_id, row.p_hash))
      yield row


def export_rows(dsn: str, classes: Sequence[str], min_confidence: float):
  with database_errors():
    with connect(dsn) as conn, conn.cursor(name='carvision_export') as cur:
      cur.execute(EXPORT_SQL, {'classes': list(classes), 'min_conf': float(min_confidence)})
      for rec in cur:
        yield rec
    conn.close()

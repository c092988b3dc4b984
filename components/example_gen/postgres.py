"""Reading the marketplace database: one Row per app.ad_images row.

This is the export query's semantics made accountable: instead of inner joins that
silently drop rows, LEFT JOINs keep every photo and say why it cannot be used
(non-car photo, missing label, (model, submodel) pair not in the catalogue).
Reads are split into ad_id ranges, each read with a server-side cursor, so Beam
workers (Dataflow's included) share the work. The password comes from PGPASSWORD.
"""
from __future__ import annotations

import json
from typing import Iterator, List, Optional, Sequence, Tuple

from components.example_gen import records

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
WHERE i.ad_id >= %(lo)s AND i.ad_id < %(hi)s
ORDER BY i.ad_id, i.position, i.id
"""

_BOUNDS_SQL = 'SELECT min(ad_id), max(ad_id), count(*) FROM app.ad_images'


def password_from_secret(secret: str) -> str:
  """The database password from Secret Manager (workers on Dataflow/Vertex); never logged."""
  from google.cloud import secretmanager  # pylint: disable=g-import-not-at-top
  client = secretmanager.SecretManagerServiceClient()
  return client.access_secret_version(name=secret).payload.data.decode('utf-8')


def connect(dsn: str, password_secret: Optional[str] = None):
  """libpq reads PGPASSWORD itself; otherwise the configured Secret Manager version."""
  import os  # pylint: disable=g-import-not-at-top
  import psycopg2  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if password_secret and not os.environ.get('PGPASSWORD'):
    kwargs['password'] = password_from_secret(password_secret)
  return psycopg2.connect(dsn, connect_timeout=10, application_name='carvision', **kwargs)


def ad_id_ranges(dsn: str, partitions: int,
                 password_secret: Optional[str] = None) -> List[Tuple[int, int]]:
  """Half-open [lo, hi) ad_id ranges covering every image row."""
  with connect(dsn, password_secret) as conn, conn.cursor() as cur:
    cur.execute(_BOUNDS_SQL)
    lo, hi, n = cur.fetchone()
  conn.close()
  if not n:
    return []
  partitions = max(1, min(int(partitions), int(n)))
  step = max(1, -(-(hi + 1 - lo) // partitions))
  return [(a, min(a + step, hi + 1)) for a in range(lo, hi + 1, step)]


def row_from_record(rec: Sequence, classes: Sequence[str], min_confidence: float) -> records.Row:
  (ad_id, p_hash, position, yolo, ad_exists, make, model, submodel, has_ids,
   pair_in_catalog) = rec
  row = records.Row(ad_id=ad_id, p_hash=p_hash, position=position,
                    make=make, model=model, submodel=submodel)
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


def read_range(dsn: str, lo: int, hi: int, classes: Sequence[str], min_confidence: float,
               itersize: int = 2000, password_secret: Optional[str] = None) -> Iterator[records.Row]:
  """Streams one ad_id range through a named (server-side) cursor."""
  conn = connect(dsn, password_secret)
  try:
    with conn.cursor(name=f'carvision_{lo}_{hi}') as cur:
      cur.itersize = itersize
      cur.execute(_ROWS_SQL, {'lo': lo, 'hi': hi})
      for rec in cur:
        yield row_from_record(rec, classes, min_confidence)
  finally:
    conn.close()


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


def export_rows(dsn: str, classes: Sequence[str], min_confidence: float):
  with connect(dsn) as conn, conn.cursor(name='carvision_export') as cur:
    cur.execute(EXPORT_SQL, {'classes': list(classes), 'min_conf': float(min_confidence)})
    for rec in cur:
      yield rec
  conn.close()

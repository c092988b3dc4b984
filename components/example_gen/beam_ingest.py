"""The ingestion Beam graph, shared by the TFX ExampleGen executor and `carvision ingest`.

rows (Postgres ranges or cars.csv) -> row checks -> de-dup by p_hash -> fetch +
validate (bounded concurrency) -> tf.Examples split by hash(ad_id) | dead letters.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import apache_beam.io.fileio  # noqa: F401  (beam.io.fileio)
from apache_beam.metrics import Metrics

from carvision.components.errors import SourceError, UserError
from carvision.components import images
from carvision.components.example_gen import records

NAMESPACE = 'carvision.ingest'
DEAD_LETTER_DIR = 'dead_letters'
SUMMARY_FILE = 'summary.json'


def _count(name: str) -> None:
  Metrics.counter(NAMESPACE, name).inc()


class _CheckRow(beam.DoFn):
  """Source-side reasons, p_hash shape, label completeness: before any network use."""

  def __init__(self, p_hash_pattern: str):
    self.pattern = p_hash_pattern

  def process(self, row: records.Row):
    _count('rows')
    if row.reason:
      yield beam.pvalue.TaggedOutput('dead', records.dead(row, row.reason, row.detail))
      return
    bad = records.check_p_hash(row, self.pattern) or records.check_label(row)
    if bad:
      yield beam.pvalue.TaggedOutput('dead', bad)
      return
    yield row


def _dedup(item: Tuple[str, Iterable[records.Row]]):
  """The same photo (p_hash) twice in the data set is kept once: the earliest ad/position."""
  _, rows = item
  ordered = sorted(rows, key=lambda r: (r.ad_id, r.position))
  yield ordered[0]
  for r in ordered[1:]:
    yield beam.pvalue.TaggedOutput(
        'dead', records.dead(r, records.DUPLICATE,
                             f'same p_hash already in ad {ordered[0].ad_id}'))


class _FetchAndValidate(beam.DoFn):
  """Fetches a batch of photos concurrently through one pooled session per worker."""

  def __init__(self, ingest: Dict[str, Any]):
    self.ingest = ingest
    self.fetcher = None

  def setup(self):
    from carvision.components.example_gen import fetch  # pylint: disable=g-import-not-at-top
    http = self.ingest['http']
    self.fetcher = fetch.Fetcher(
        self.ingest['image_url_template'], concurrency=http['concurrency'],
        connect_timeout_s=http['connect_timeout_s'], read_timeout_s=http['read_timeout_s'],
        retries=http['retries'], backoff_factor=http['backoff_factor'],
        max_bytes=int(http.get('max_bytes') or (64 << 20)),
        deadline_s=float(http.get('deadline_s') or 60.0),
        max_requests_per_s=(float(http['max_requests_per_s']) / max(1, int(http.get('workers') or 1))
                            if http.get('max_requests_per_s') else None))

  def teardown(self):
    if self.fetcher is not None:
      self.fetcher.close()

  def process(self, batch: List[records.Row]):
    results = self.fetcher.fetch_many([r.p_hash for r in batch])
    for row, (data, reason, detail) in zip(batch, results):
      if reason is None:
        reason, detail, width, height = records.validate_image(data, self.ingest['max_pixels'])
      if reason is None:
        reason, detail = records.check_photo_matches(data, row.p_hash,
                                                     self.ingest.get('p_hash_max_distance'))
      if reason is not None:
        yield beam.pvalue.TaggedOutput('dead', records.dead(row, reason, detail))
        continue
      # Stored upright: the training graph's JPEG decoder ignores EXIF, `predict` does not.
      upright = images.upright_jpeg(data)
      if upright is not None:
        _count('exif_rotated')
        data, (width, height) = upright, images.size_of(upright)
      split = records.split_for(row.ad_id, self.ingest['splits'])
      _count(f'examples_{split}')
      yield split, records.to_example(row, data, width, height).SerializeToString()


def _count_dead(letter: records.DeadLetter) -> records.DeadLetter:
  _count(f'dead_letter_{letter.reason}')
  return letter


def resolve_csv(pattern: str, span: Any = None) -> Dict[str, Any]:
  """Resolves TFX span/version specs in a cars.csv pattern (monthly export = new span).

  `exports/{SPAN}/cars-v{VERSION}.csv` -> the latest span (or `span` when given) and its
  latest version, as TFX's file-based ExampleGen does ({YYYY}/{MM}/{DD} work too).
  Returns {'pattern', 'span', 'version', 'fingerprint'}; span 0 when there is no spec.
  """
  from tfx.components.example_gen import utils  # pylint: disable=g-import-not-at-top
  from tfx.proto import example_gen_pb2, range_config_pb2  # pylint: disable=g-import-not-at-top
  cut = min([i for i in (pattern.find('{'), pattern.find('*'), pattern.find('?'),
                         pattern.find('[')) if i >= 0] or [len(pattern)])
  base = pattern[:cut].rsplit('/', 1)[0] if '/' in pattern[:cut] else '.'
  rel = pattern[len(base) + 1:] if base != '.' else pattern
  split = example_gen_pb2.Input.Split(name='csv', pattern=rel)
  rc = None
  if span is not None:
    rc = range_config_pb2.RangeConfig(static_range=range_config_pb2.StaticRange(
        start_span_number=int(span), end_span_number=int(span)))
  fingerprint, sel_span, sel_version = utils.calculate_splits_fingerprint_span_and_version(
      base, [split], rc)
  return {'pattern': os.path.join(base, split.pattern) if base != '.' else split.pattern,
          'span': int(sel_span), 'version': sel_version, 'fingerprint': fingerprint}


def read_rows(p: beam.Pipeline, ingest: Dict[str, Any]) -> Tuple[beam.PCollection, Optional[int]]:
  """(rows, rows counted at the source): Postgres (parallel ad_id ranges, counted by the
  database when the read is planned) or cars.csv exports (counted as parsed)."""
  if bool(ingest.get('dsn')) == bool(ingest.get('csv')):
    raise UserError('ingest needs exactly one of `dsn` (Postgres) or `csv` (cars.csv pattern)')
  if ingest.get('dsn'):
    from carvision.components.example_gen import postgres  # pylint: disable=g-import-not-at-top
    dsn, classes, conf = ingest['dsn'], ingest['vehicle_classes'], ingest['min_confidence']
    secret = ingest.get('password_secret')
    plan = postgres.plan_reads(dsn, ingest['partitions'], secret)
    max_id = plan['max_id']
    rows = (p
            | 'AdIdRanges' >> beam.Create(plan['ranges'])
            | 'ShareRanges' >> beam.Reshuffle()
            | 'ReadPostgres' >> beam.FlatMap(
                lambda r: postgres.read_range(dsn, r[0], r[1], classes, conf, max_id,
                                              password_secret=secret)))
    return rows, plan['rows']
  pattern = ingest['csv']
  if '{' in pattern:
    pattern = resolve_csv(pattern, ingest.get('span'))['pattern']
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  if not FileSystems.match([pattern])[0].metadata_list:
    raise UserError(f'ingest.csv: no file matches {pattern!r}')
  # One file is parsed whole by one worker: CSV records may span lines (quoted newlines),
  # which a line-splitting reader cannot see.
  return (p
          | 'MatchCsv' >> beam.io.fileio.MatchFiles(pattern)
          | 'OpenCsv' >> beam.io.fileio.ReadMatches()
          | 'ParseCsv' >> beam.FlatMap(lambda f: records.rows_from_csv(
              f.read(), os.path.basename(f.metadata.path)))), None


def build(p: beam.Pipeline, ingest: Dict[str, Any], examples_uri: str, dead_uri: str) -> None:
  """Adds the ingestion graph to `p`, writing Split-<name>/ TFRecords and dead letters."""
  rows, source_rows = read_rows(p, ingest)
  checked = rows | 'CheckRows' >> beam.ParDo(_CheckRow(ingest['p_hash_pattern'])).with_outputs(
      'dead', main='ok')
  deduped = (checked.ok
             | 'KeyByPHash' >> beam.Map(lambda r: (r.p_hash, r))
             | 'GroupByPHash' >> beam.GroupByKey()
             | 'KeepFirst' >> beam.FlatMap(_dedup).with_outputs('dead', main='ok'))
  fetched = (deduped.ok
             | 'Spread' >> beam.Reshuffle()
             | 'Batch' >> beam.BatchElements(min_batch_size=8, max_batch_size=64)
             | 'FetchValidate' >> beam.ParDo(_FetchAndValidate(ingest)).with_outputs(
                 'dead', main='ok'))
  dead = ((checked.dead, deduped.dead, fetched.dead)
          | 'AllDead' >> beam.Flatten()
          | 'CountDead' >> beam.Map(_count_dead))

  split_names = list(ingest['splits'])
  parts = fetched.ok | 'BySplit' >> beam.Partition(
      lambda kv, n: split_names.index(kv[0]), len(split_names))
  for name, part in zip(split_names, parts):
    _ = (part
         | f'Values[{name}]' >> beam.Values()
         | f'Write[{name}]' >> beam.io.WriteToTFRecord(
             os.path.join(examples_uri, f'Split-{name}', 'data_tfrecord'),
             file_name_suffix='.gz'))
  _ = (dead
       | 'DeadJson' >> beam.Map(lambda d: d.to_json())
       | 'WriteDead' >> beam.io.WriteToText(
           os.path.join(dead_uri, DEAD_LETTER_DIR, 'dead_letters'), file_name_suffix='.jsonl'))

  # Rows read are counted as they leave the source, apart from what they became.
  outcomes = ((rows | 'ReadKeys' >> beam.Map(lambda _: 'read:')),
              (fetched.ok | 'ExampleKeys' >> beam.Map(lambda kv: 'example:' + kv[0])),
              (dead | 'DeadKeys' >> beam.Map(lambda d: 'dead:' + d.reason)))
  _ = (outcomes
       | 'AllOutcomes' >> beam.Flatten()
       | 'CountOutcomes' >> beam.combiners.Count.PerElement()
       | 'ToList' >> beam.combiners.ToList()
       | 'Summarise' >> beam.Map(lambda kvs: json.dumps(_summary(kvs, split_names, source_rows)))
       | 'WriteSummary' >> beam.io.WriteToText(
           os.path.join(dead_uri, SUMMARY_FILE), num_shards=1, shard_name_template=''))


def _summary(kvs: List[Tuple[str, int]], split_names: List[str],
             source_rows: Optional[int] = None) -> Dict[str, Any]:
  """`rows` is what the source holds (the database's count, or the rows read from cars.csv),
  never examples + dead letters: `unaccounted` is what became neither (must be 0)."""
  examples = {s: 0 for s in split_names}
  dead: Dict[str, int] = {}
  read = 0
  for key, n in kvs:
    kind, _, name = key.partition(':')
    if kind == 'read':
      read = n
    elif kind == 'example':
      examples[name] = n
    else:
      dead[name] = n
  rows = read if source_rows is None else source_rows
  out = {'rows': rows, 'examples': examples, 'dead_letters': dict(sorted(dead.items()))}
  unaccounted = rows - sum(examples.values()) - sum(dead.values())
  if unaccounted or read != rows:
    out.update(rows_read=read, unaccounted=unaccounted)
  return out


def read_summary(dead_uri: str) -> Dict[str, Any]:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  with FileSystems.open(os.path.join(dead_uri, SUMMARY_FILE)) as f:
    return json.loads(f.read().decode())


def check_share(summary: Dict[str, Any], max_share: float) -> None:
  """Fails loudly when too much of the input became dead letters."""
  rows = summary['rows']
  dead = sum(summary['dead_letters'].values())
  if summary.get('unaccounted') or summary.get('rows_read', rows) != rows:
    raise SourceError(
        f"ingestion: the source holds {rows} rows but {summary.get('rows_read')} were read and "
        f"{summary.get('unaccounted')} became neither an example nor a dead letter; rows "
        'deleted while reading, or a defect: nothing was lost silently, rerun to retry')
  if rows == 0:
    raise SourceError('ingestion read 0 rows: check the source (DSN / csv pattern)')
  share = dead / rows
  if share > max_share:
    raise SourceError(
        f'ingestion: {dead} of {rows} rows ({share:.1%}) became dead letters, over the '
        f'configured limit ingest.max_dead_letter_share={max_share:.1%}; by reason: '
        f'{summary["dead_letters"]}. Is the image host or the database healthy?')

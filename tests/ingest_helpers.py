"""Running the ingestion Beam graph in-process and computing what a data set should give."""
import collections
import dataclasses
import glob
import json
import os

import apache_beam as beam

from carvision.components.example_gen import beam_ingest
from carvision.pipeline import config as config_lib


def ingest_config(**over):
  cfg = dataclasses.asdict(config_lib.load('default').ingest)
  cfg['http'].update(over.pop('http', {}))
  cfg.update(over)
  return cfg


def run_ingest(tmp_path, **over):
  """Runs ingestion with the DirectRunner; returns (summary, dead letters, examples by split)."""
  import tensorflow as tf
  cfg = ingest_config(**over)
  out = str(tmp_path)
  with beam.Pipeline() as p:
    beam_ingest.build(p, cfg, os.path.join(out, 'examples'), out)
  summary = beam_ingest.read_summary(out)
  dead = []
  for f in glob.glob(os.path.join(out, 'dead_letters', '*.jsonl')):
    with open(f) as fh:
      dead.extend(json.loads(line) for line in fh if line.strip())
  examples = {}
  for split in cfg['splits']:
    files = glob.glob(os.path.join(out, 'examples', f'Split-{split}', '*.gz'))
    examples[split] = [tf.train.Example.FromString(r.numpy())
                       for r in tf.data.TFRecordDataset(files, compression_type='GZIP')]
  return summary, dead, examples


def expected_from_labels(labels, manifest, images_dir=None):
  """What the database rows must become, from labels.csv ground truth and the noise ids."""
  noise = manifest['noise_ids']
  unlinked = {int(a) for a in noise['d_unlinked_model_submodel_ads']}
  null_sub = {int(a) for a in noise['d_null_submodel_ads']}
  missing = set(noise['b_missing_file_rows'])
  corrupt = set(noise['c_corrupt_files'])
  reasons = collections.Counter()
  examples = 0
  seen = set()
  for row in sorted(labels, key=lambda r: int(r['ad_id'])):
    ad = int(row['ad_id'])
    if row['is_car'] != 'true':
      reasons['non_car'] += 1
    elif ad in null_sub:
      reasons['missing_label'] += 1
    elif ad in unlinked:
      reasons['pair_not_in_catalog'] += 1
    elif row['p_hash'] in seen:
      reasons['duplicate'] += 1
    elif row['p_hash'] in missing:
      reasons['http_404'] += 1
      seen.add(row['p_hash'])
    elif row['p_hash'] in corrupt:
      # Truncated JPEGs are corrupt; random bytes are not JPEG at all (magic bytes).
      head = b'\xff\xd8\xff'
      if images_dir:
        with open(os.path.join(images_dir, row['p_hash'] + '.jpg'), 'rb') as f:
          head = f.read(3)
      reasons['corrupt_jpeg' if head == b'\xff\xd8\xff' else 'not_jpeg'] += 1
      seen.add(row['p_hash'])
    else:
      examples += 1
      seen.add(row['p_hash'])
  return examples, dict(reasons)

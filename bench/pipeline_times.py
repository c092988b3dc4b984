"""Per-component wall time of the pipeline runs recorded in an ML Metadata store.

  scripts/env.sh run 'python bench/pipeline_times.py runs/demo/metadata.sqlite'

One line per execution: start (seconds after the store's first execution), duration (from
registration to its last update: cached or skipped components show ~0), component, state.
"""
import sys

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2


def main():
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  config = metadata_store_pb2.ConnectionConfig()
  config.sqlite.filename_uri = sys.argv[1]
  config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
  store = metadata_store.MetadataStore(config)
  types = {t.id: t.name.split('.')[-1] for t in store.get_execution_types()}
  rows = sorted((e.create_time_since_epoch, e.last_update_time_since_epoch, types[e.type_id],
                 metadata_store_pb2.Execution.State.Name(e.last_known_state))
                for e in store.get_executions())
  if not rows:
    sys.exit('no executions recorded')
  t0 = rows[0][0]
  for start, end, name, state in rows:
    print(f'{(start - t0) / 1000:9.1f}s {(end - start) / 1000:8.1f}s  {name:<32} {state}')


if __name__ == '__main__':
  main()

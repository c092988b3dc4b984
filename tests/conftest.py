"""Shared fixtures: a real throwaway PostgreSQL, a real photo host on loopback.

TensorFlow/protobuf can crash at interpreter teardown (exit 139) with some version
sets; the session's real exit status is kept by leaving through os._exit.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from carvision.pipeline import services  # noqa: E402
from tests.helpers import REPO, SHARED_FULL, TINY  # noqa: E402,F401

_rc = 0


def pytest_sessionfinish(session, exitstatus):
  global _rc
  _rc = int(exitstatus)


def pytest_unconfigure(config):
  sys.stdout.flush()
  sys.stderr.flush()
  if hasattr(config, 'workerinput'):  # a pytest-xdist worker: its results still travel to the
    import atexit                     # controller after this hook, so leave once they have
    atexit.register(os._exit, _rc)
    return
  os._exit(_rc)


SLOWEST_FIRST = ('tests/test_pipeline_e2e.py',)


def pytest_configure(config):
  config.addinivalue_line('markers', 'e2e: runs the real TFX pipeline (minutes); '
                          '`make test-fast` leaves these out')


def pytest_collection_modifyitems(items):
  """The end-to-end module first (stable order otherwise): on 2 workers its pipeline runs
  set the wall time, so the other files fill the other worker meanwhile."""
  items.sort(key=lambda item: 0 if item.nodeid.startswith(SLOWEST_FIRST) else 1)


@pytest.fixture(scope='session')
def postgres():
  pg = services.Postgres()
  yield pg
  pg.stop()


@pytest.fixture(scope='session')
def tiny_dsn(postgres):
  return postgres.create_db('tiny', os.path.join(TINY, 'seez.sql'))


@pytest.fixture()
def image_host():
  from tests.photo_host import FaultyImageHost
  host = FaultyImageHost(os.path.join(TINY, 'images'))
  yield host
  host.stop()


@pytest.fixture(scope='session')
def tiny_labels():
  import csv
  with open(os.path.join(TINY, 'labels.csv')) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='session')
def tiny_manifest():
  import json
  with open(os.path.join(TINY, 'manifest.json')) as f:
    return json.load(f)

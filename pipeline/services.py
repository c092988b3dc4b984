"""Throwaway local services for the demo and the tests: PostgreSQL and a photo host.

PostgreSQL: initdb + pg_ctl in a temporary directory on a free loopback port (as the
`postgres` user when run as root); the dump is loaded with psql. The photo host: an
HTTP server on loopback serving `<dir>/<p_hash>.jpg`.
"""
from __future__ import annotations

import contextlib
import glob
import http.server
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Dict, Iterator, Optional


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pg_bindir() -> str:
  for name in ('initdb', 'pg_ctl'):
    path = shutil.which(name)
    if path and os.path.exists(os.path.join(os.path.dirname(path), 'postgres')):
      return os.path.dirname(path)
  cands = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                 key=lambda p: int(p.split('/')[-3]) if p.split('/')[-3].isdigit() else 0)
  if not cands:
    raise FileNotFoundError('PostgreSQL server binaries (initdb, pg_ctl) not found; install '
                            'PostgreSQL or set CARVISION_DSN to an existing database')
  return os.path.dirname(cands[-1])


class Postgres:
  """A PostgreSQL cluster living in a temporary directory, stopped by `stop()`."""

  def __init__(self):
    self.bindir = _pg_bindir()
    self.port = free_port()
    self.tmp = tempfile.mkdtemp(prefix='carvision-pg-')
    self.data = os.path.join(self.tmp, 'data')
    self.user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
      self.user = 'postgres'
      uid = pwd.getpwnam(self.user)
      os.chown(self.tmp, uid.pw_uid, uid.pw_gid)
    self._run([os.path.join(self.bindir, 'initdb'), '-D', self.data, '-U', 'postgres',
               '--auth=trust', '-E', 'UTF8', '--no-sync'])
    self._run([os.path.join(self.bindir, 'pg_ctl'), '-D', self.data, '-l',
               os.path.join(self.tmp, 'postgres.log'), '-w', '-o',
               f'-c listen_addresses=127.0.0.1 -p {self.port} -k {self.tmp} -c fsync=off',
               'start'])

  def _run(self, cmd, **kw):
    if self.user:
      cmd = ['runuser', '-u', self.user, '--'] + cmd
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)

  def dsn(self, dbname: str = 'postgres') -> str:
    return f'host=127.0.0.1 port={self.port} user=postgres dbname={dbname}'

  def create_db(self, name: str, sql_file: Optional[str] = None) -> str:
    import psycopg2  # pylint: disable=g-import-not-at-top
    from psycopg2 import sql  # pylint: disable=g-import-not-at-top
    conn = psycopg2.connect(self.dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
      cur.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
    conn.close()
    if sql_file:
      load_sql(self.dsn(name), sql_file)
    return self.dsn(name)

  def stop(self):
    if os.path.exists(self.data):
      with contextlib.suppress(subprocess.CalledProcessError):
        self._run([os.path.join(self.bindir, 'pg_ctl'), '-D', self.data, '-m', 'immediate',
                   '-w', 'stop'])
    shutil.rmtree(self.tmp, ignore_errors=True)


def load_sql(dsn: str, sql_file: str) -> None:
  """Loads a plain-SQL dump with psql (COPY blocks need psql, not a driver)."""
  psql = shutil.which('psql') or os.path.join(_pg_bindir(), 'psql')
  res = subprocess.run([psql, '-q', '-v', 'ON_ERROR_STOP=1', '-d', dsn, '-f', sql_file],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if res.returncode:
    raise RuntimeError(f'loading {sql_file} failed: {res.stdout[-2000:]}')


class ImageHost:
  """Serves `<directory>/<name>` over HTTP on 127.0.0.1: the photo host of the demo and of
  `--data` (tests/photo_host.py adds faults to it)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), self.handler())
    self.server.daemon_threads = True
    self.port = self.server.server_address[1]
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def handler(self) -> type:
    host = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def __init__(self, *a, **kw):
        super().__init__(*a, directory=host.directory, **kw)

      def log_message(self, *args):  # quiet
        pass

    return Handler

  @property
  def url_template(self) -> str:
    return f'http://127.0.0.1:{self.port}/{{p_hash}}.jpg'

  def stop(self):
    self.server.shutdown()
    self.server.server_close()


@contextlib.contextmanager
def local_services(data_dir: str, dsn: Optional[str] = None) -> Iterator[Dict[str, str]]:
  """A database loaded with `<data_dir>/seez.sql` (or `dsn` when given) and a photo host."""
  pg = None
  host = ImageHost(os.path.join(data_dir, 'images'))
  try:
    if not dsn:
      pg = Postgres()
      dsn = pg.create_db('seez', os.path.join(data_dir, 'seez.sql'))
    yield {'dsn': dsn, 'image_url_template': host.url_template}
  finally:
    host.stop()
    if pg is not None:
      pg.stop()

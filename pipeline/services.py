"""Throwaway local services for the demo and the tests: PostgreSQL and a photo host.

PostgreSQL: initdb + pg_ctl in a temporary directory on a free loopback port (as the
`postgres` user when run as root); the dump is loaded with psql. The photo host: an
HTTP server on loopback serving `<dir>/<p_hash>.jpg`, able to inject faults.
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
import time
from typing import Callable, Dict, Iterator, Optional


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


# A fault: called with the p_hash; returns (status, body) to answer instead of the file,
# (None, seconds) to hang and close without answering, ('trickle', seconds) to send the
# file one byte every `seconds` (a slow host that never trips a read timeout; it gives up
# after 60 s or when the client goes), or None to serve the file.
Fault = Callable[[str], Optional[tuple]]


class ImageHost:
  """Serves `<directory>/<name>` over HTTP on 127.0.0.1; `faults` rewrite answers per p_hash."""

  def __init__(self, directory: str, latency_s: float = 0.0):
    self.directory = directory
    self.latency_s = latency_s
    self.faults: Dict[str, Fault] = {}
    self.hits: Dict[str, int] = {}
    host = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def __init__(self, *a, **kw):
        super().__init__(*a, directory=host.directory, **kw)

      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # noqa: N802
        name = os.path.basename(self.path.split('?')[0])
        key = name.rsplit('.', 1)[0]
        host.hits[key] = host.hits.get(key, 0) + 1
        if host.latency_s:
          time.sleep(host.latency_s)
        fault = host.faults.get(key)
        answer = fault(key) if fault else None
        if answer is not None:
          status, body = answer
          if status is None:  # hang: sleep `body` seconds, then close without answering
            time.sleep(body)
            self.close_connection = True
            return
          if status == 'trickle':
            self._trickle(os.path.join(host.directory, name), float(body))
            return
          self.send_response(status)
          self.send_header('Content-Type', 'image/jpeg')
          self.send_header('Content-Length', str(len(body)))
          self.end_headers()
          self.wfile.write(body)
          return
        super().do_GET()

      def _trickle(self, path, every_s):
        with open(path, 'rb') as f:
          data = f.read()
        self.send_response(200)
        self.send_header('Content-Type', 'image/jpeg')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.close_connection = True
        end = time.monotonic() + 60.0
        for i in range(len(data)):
          if time.monotonic() > end:
            return
          try:
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
          except OSError:  # the client gave up
            return
          time.sleep(every_s)

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.server.daemon_threads = True
    self.port = self.server.server_address[1]
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

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

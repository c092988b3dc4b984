"""Fetching photos from the image host: one pooled HTTP session per worker.

Retries (urllib3's Retry) with exponential backoff on 5xx, timeouts and connection
resets, never on 404; connect/read timeouts; bounded concurrency by a thread pool
the size of the connection pool; an overall deadline per fetch (a host trickling bytes
never trips a read timeout, which bounds only the gap between bytes). Non-HTTP templates (gs://, local paths) are read
through Beam's FileSystems.
"""
from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from typing import List, Optional, Sequence, Tuple

from carvision.components.errors import SourceError, UserError
from carvision.components.example_gen import records

# (data or None, dead-letter reason or None, detail)
FetchResult = Tuple[Optional[bytes], Optional[str], str]


class RateLimiter:
  """Spaces calls `1 / rate` seconds apart across this worker's threads (rate None: no limit).

  A job-wide limit is split over workers: each fetching worker gets `global / workers`.
  """

  def __init__(self, rate: Optional[float]):
    self.interval = 1.0 / float(rate) if rate else 0.0
    self._next = time.monotonic()
    self._lock = threading.Lock()

  def wait(self) -> None:
    if not self.interval:
      return
    with self._lock:
      now = time.monotonic()
      slot = max(self._next, now)
      self._next = slot + self.interval
    if slot > now:
      time.sleep(slot - now)


class _Watchdog:
  """Cuts the socket of any fetch past its deadline (one daemon thread per process).

  A fetching thread announces its deadline, the HTTP connection attaches the socket it
  sends on (the connection classes of `_watched_pools`), and past the deadline the watchdog shuts that socket
  down, which wakes the blocked read; the fetch is then a `timeout` dead letter.
  """

  def __init__(self, tick_s: float = 0.2):
    self.tick_s = tick_s
    self.inflight = {}  # thread ident -> [deadline (monotonic), socket or None, expired]
    self.lock = threading.Lock()
    threading.Thread(target=self._run, name='carvision-fetch-watchdog', daemon=True).start()

  def begin(self, seconds: float) -> None:
    with self.lock:
      self.inflight[threading.get_ident()] = [time.monotonic() + seconds, None, False]

  def attach(self, sock) -> None:
    with self.lock:
      entry = self.inflight.get(threading.get_ident())
      if entry is not None:
        entry[1] = sock
        if entry[2]:
          _cut(sock)

  def end(self) -> bool:
    """True when the deadline passed during this fetch."""
    with self.lock:
      entry = self.inflight.pop(threading.get_ident(), None)
    return bool(entry and entry[2])

  def _run(self):
    while True:
      time.sleep(self.tick_s)
      now = time.monotonic()
      with self.lock:
        for entry in self.inflight.values():
          if not entry[2] and now >= entry[0]:
            entry[2] = True
            if entry[1] is not None:
              _cut(entry[1])


def _cut(sock) -> None:
  try:
    sock.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass


_WATCHDOG = None
_WATCHDOG_LOCK = threading.Lock()


def watchdog() -> _Watchdog:
  global _WATCHDOG
  with _WATCHDOG_LOCK:
    if _WATCHDOG is None:
      _WATCHDOG = _Watchdog()
  return _WATCHDOG


def _watched_pools():
  """urllib3 connection pools whose connections attach their socket to the watchdog."""
  from urllib3 import connection, connectionpool  # pylint: disable=g-import-not-at-top

  class _Attach:
    def request(self, *args, **kwargs):
      super().request(*args, **kwargs)  # connects first when needed: self.sock is set after
      if self.sock is not None:
        watchdog().attach(self.sock)

  http_conn = type('WatchedHTTPConnection', (_Attach, connection.HTTPConnection), {})
  https_conn = type('WatchedHTTPSConnection', (_Attach, connection.HTTPSConnection), {})
  return {'http': type('WatchedHTTPConnectionPool', (connectionpool.HTTPConnectionPool,),
                       {'ConnectionCls': http_conn}),
          'https': type('WatchedHTTPSConnectionPool', (connectionpool.HTTPSConnectionPool,),
                        {'ConnectionCls': https_conn})}



def check_credentials(url_template: str) -> None:
  """A gs:// photo host needs Google Cloud credentials: without them every photo would become
  a `connection_error` dead letter after its retries (minutes), so say so once, before any
  work. Other schemes need nothing here."""
  if not str(url_template).startswith('gs://'):
    return
  import google.auth  # pylint: disable=g-import-not-at-top
  from google.auth import exceptions  # pylint: disable=g-import-not-at-top
  try:
    google.auth.default()
  except exceptions.DefaultCredentialsError:
    raise SourceError(
        f'photo host {url_template.split("{")[0]}: no Google Cloud credentials found (set '
        'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run `gcloud auth '
        'application-default login`)') from None

class Fetcher:
  """Fetches `<template with {p_hash}>` for many rows at once, bounded by `concurrency`."""

  def __init__(self, url_template: str, concurrency: int = 32, connect_timeout_s: float = 5.0,
               read_timeout_s: float = 20.0, retries: int = 3, backoff_factor: float = 0.2,
               max_bytes: int = 64 << 20, max_requests_per_s: Optional[float] = None,
               deadline_s: float = 60.0):
    if '{p_hash}' not in url_template:
      raise UserError(f'ingest.image_url_template must contain {{p_hash}}: {url_template!r}')
    self.template = url_template
    self.is_http = url_template.startswith(('http://', 'https://'))
    self.concurrency = max(1, int(concurrency))
    self.timeout = (connect_timeout_s, read_timeout_s)
    self.max_bytes = max_bytes
    self.deadline_s = float(deadline_s)
    self.limiter = RateLimiter(max_requests_per_s)
    self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency)
    self.session = None
    if self.is_http:
      import requests  # pylint: disable=g-import-not-at-top
      from requests.adapters import HTTPAdapter  # pylint: disable=g-import-not-at-top
      from urllib3.util.retry import Retry  # pylint: disable=g-import-not-at-top
      retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                    backoff_factor=backoff_factor, status_forcelist=(500, 502, 503, 504),
                    allowed_methods=frozenset(['GET']), raise_on_status=False,
                    respect_retry_after_header=False)
      adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency,
                            max_retries=retry, pool_block=True)
      adapter.poolmanager.pool_classes_by_scheme = _watched_pools()
      self.session = requests.Session()
      self.session.mount('http://', adapter)
      self.session.mount('https://', adapter)

  def location(self, p_hash: str) -> str:
    return self.template.format(p_hash=p_hash)

  def fetch(self, p_hash: str) -> FetchResult:
    return self._fetch_http(p_hash) if self.is_http else self._fetch_file(p_hash)

  def fetch_many(self, p_hashes: Sequence[str]) -> List[FetchResult]:
    return list(self._pool.map(self.fetch, p_hashes))

  def close(self):
    self._pool.shutdown(wait=False)
    if self.session is not None:
      self.session.close()

  def _fetch_http(self, p_hash: str) -> FetchResult:
    url = self.location(p_hash)
    self.limiter.wait()
    watch = watchdog()
    watch.begin(self.deadline_s)
    try:
      result = self._get(url)
    finally:
      expired = watch.end()
    if expired:  # whatever the cut connection returned (an error, a truncated body)
      return None, records.TIMEOUT, (f'{url}: not complete within the {self.deadline_s:g} s '
                                     'fetch deadline (ingest.http.deadline_s)')
    return result

  def _get(self, url: str) -> FetchResult:
    import requests  # pylint: disable=g-import-not-at-top
    try:
      with self.session.get(url, timeout=self.timeout, stream=True) as resp:
        if resp.status_code == 404:
          return None, records.HTTP_404, url
        if resp.status_code >= 500:
          return None, records.HTTP_5XX, f'{resp.status_code} after retries: {url}'
        if resp.status_code != 200:
          return None, records.HTTP_4XX, f'{resp.status_code}: {url}'
        chunks, size = [], 0
        for chunk in resp.iter_content(1 << 16):
          size += len(chunk)
          if size > self.max_bytes:
            return None, records.TOO_LARGE, f'body over {self.max_bytes} bytes: {url}'
          chunks.append(chunk)
        return b''.join(chunks), None, ''
    except requests.exceptions.RetryError as e:  # retries used up on a status
      return None, records.HTTP_5XX, f'{url}: {e}'[:300]
    except (requests.exceptions.Timeout,) as e:
      return None, records.TIMEOUT, f'{url}: {type(e).__name__}'
    except requests.exceptions.ConnectionError as e:
      text = str(e)
      reason = records.TIMEOUT if 'timed out' in text.lower() else records.CONNECTION
      return None, reason, f'{url}: {text}'[:300]
    except requests.exceptions.RequestException as e:
      return None, records.CONNECTION, f'{url}: {type(e).__name__}: {e}'[:300]

  def _fetch_file(self, p_hash: str) -> FetchResult:
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
    path = self.location(p_hash)
    try:
      if not FileSystems.exists(path):
        return None, records.MISSING_FILE, path
      with FileSystems.open(path, compression_type='uncompressed') as f:
        data = f.read(self.max_bytes + 1)
      if len(data) > self.max_bytes:
        return None, records.TOO_LARGE, f'file over {self.max_bytes} bytes: {path}'
      return data, None, ''
    except Exception as e:  # pylint: disable=broad-except
      return None, records.CONNECTION, f'{path}: {type(e).__name__}: {e}'[:300]

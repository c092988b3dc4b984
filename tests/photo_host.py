"""The tests' photo host: the product's loopback host plus faults, latency and a hit count."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

from carvision.pipeline import services

# A fault: called with the p_hash; returns (status, body) to answer instead of the file,
# (None, seconds) to hang and close without answering, ('trickle', seconds) to send the
# file one byte every `seconds` (a slow host that never trips a read timeout; it gives up
# after 60 s or when the client goes), or None to serve the file.
Fault = Callable[[str], Optional[tuple]]


class FaultyImageHost(services.ImageHost):
  """`faults` rewrite answers per p_hash; `hits` counts requests; `latency_s` delays each."""

  def __init__(self, directory: str, latency_s: float = 0.0):
    self.latency_s = latency_s
    self.faults: Dict[str, Fault] = {}
    self.hits: Dict[str, int] = {}
    super().__init__(directory)

  def handler(self) -> type:
    host, base = self, super().handler()

    class Handler(base):
      def do_GET(self):  # noqa: N802
        name = os.path.basename(self.path.split('?')[0])
        key = name.rsplit('.', 1)[0]
        host.hits[key] = host.hits.get(key, 0) + 1
        if host.latency_s:
          time.sleep(host.latency_s)
        fault = host.faults.get(key)
        answer = fault(key) if fault else None
        if answer is None:
          super().do_GET()
          return
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

    return Handler

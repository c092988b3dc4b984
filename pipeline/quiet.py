"""Quiet by default: TensorFlow, absl and Beam start-up chatter off the terminal, progress on it.

`carvision run / demo / ingest / audit` print one line per pipeline component as it starts
and ends, the Trainer's epochs and the summary. What the libraries say about themselves
(oneDNN, CUDA drivers on a machine without a GPU, Beam's worker set-up, TFX's deprecation
notes) is dropped from stderr at the file-descriptor level, so Beam worker processes and C++
code are filtered too; everything else, real errors included, passes. `--verbose` shows it all.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from typing import Optional

# A line that starts a new record: after a dropped record, the lines that do not start one
# are its continuation (a deprecation note's "Instructions for updating: ..." lines) and go too.
RECORD_START = re.compile(r'^(\[carvision\]|[A-Za-z][\w.-]*:|[IWEF]\d{4} |Traceback|=|\s*$)')

# Lines a run prints on every start on a CPU machine, none of which needs an action.
NOISE = re.compile('|'.join([
    r'^WARNING: All log messages before absl::InitializeLog\(\) is called',
    r'^[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] ',             # C++ INFO / WARNING lines (absl)
    r'^E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit',
    r'oneDNN custom operations are on',
    r'Could not find cuda drivers',
    r'Unable to register cu(DNN|FFT|BLAS) factory',
    r'computation placer already registered',
    r'This TensorFlow binary is optimized to use available CPU instructions',
    r'TF-TRT Warning',
    r'^WARNING:absl:(Tables initialized inside a tf\.function|ArtifactQuery\.property_predicate'
    r'|Fallback to non-ZetaSQL|Examples artifact does not have payload_format'
    r'|Function `\w+` contains input name|Found untraced functions'
    r'|`\w+` is not supported|You are saving your model as an HDF5)',
    r'^WARNING:apache_beam\.runners\.portability\.local_job_service:Worker: severity: WARN',
    r'No semi_persistent_directory found',
    r'Discarding unparseable args',
    r'^WARNING:apache_beam\.(options\.pipeline_options|runners\.worker\.sdk_worker_main)',
    r'^WARNING:root:Make sure that locally built Python SDK docker image',
    r'^WARNING:tensorflow:(From |Compiled the loaded model|Skipping full serialization'
    r'|Detecting that an object or model|Value in checkpoint could not be found'
    r'|A checkpoint was restored|Unresolved object in checkpoint|Model\'s `__init__\(\)`'
    r'|`tf\.keras\.callbacks|Layer \w+ will not use cuDNN|Issue encountered when serializing)',
    r'^WARNING:tensorflow:\s',                               # continuation of the lines above
    r'^\s+(Warning: )?tf\.lite\.Interpreter is deprecated',
    r'^\s*(TF 2\.20\. Please use the LiteRT|See the \[migration guide\]|for details\.)\s*$',
    r'^INFO:tensorflow:',
    r'^WARNING:absl:Please consider providing the trackable_obj argument',
    r'^fully_quantize: \d+, inference_type: ',
    r'^INFO: Created TensorFlow Lite XNNPACK delegate',
    r'^WARNING:tensorflow:No training configuration found in save file',
    r'^Instructions for updating:',
    r'^INFO:absl:',
    r'^I\d{4} \d\d:\d\d:\d\d\.\d+ ',
]))


class StderrFilter:
  """fd 2 through a pipe; a thread writes the lines that are not NOISE to the real stderr."""

  def __init__(self):
    self.saved: Optional[int] = None
    self.thread: Optional[threading.Thread] = None
    self.dropped = 0
    self.in_noise = False  # inside a dropped record's continuation lines

  def start(self) -> 'StderrFilter':
    sys.stderr.flush()
    self.saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
    self.thread.start()
    return self

  def _pump(self, read: int) -> None:
    pending = b''
    while True:
      chunk = os.read(read, 65536)
      if not chunk:
        break
      pending += chunk
      *lines, pending = pending.split(b'\n')
      self._emit(lines)
    if pending:
      self._emit([pending])
    os.close(read)

  def _emit(self, lines) -> None:
    out = []
    for line in lines:
      text = line.decode('utf-8', 'replace')
      if NOISE.search(text) or (self.in_noise and not RECORD_START.search(text)):
        self.dropped += 1
        self.in_noise = True
      else:
        self.in_noise = False
        out.append(line + b'\n')
    if out:
      os.write(self.saved, b''.join(out))

  def stop(self) -> None:
    """Puts stderr back; lines still in the pipe are written (worker processes that still
    hold it only delay the end by a moment)."""
    if self.saved is None:
      return
    sys.stderr.flush()
    os.dup2(self.saved, 2)  # our end of the pipe is closed: the thread sees EOF
    if self.thread is not None:
      self.thread.join(timeout=2.0)
    self.saved = None


_FILTER: Optional[StderrFilter] = None


def install() -> None:
  """Quiet mode for this process and the processes it starts."""
  global _FILTER
  warnings.simplefilter('ignore')  # library deprecation notes; errors are exceptions, not warnings
  os.environ['PYTHONWARNINGS'] = 'ignore'  # Beam worker processes
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if _FILTER is None:
    _FILTER = StderrFilter().start()


def uninstall() -> None:
  global _FILTER
  if _FILTER is not None:
    _FILTER.stop()
    _FILTER = None

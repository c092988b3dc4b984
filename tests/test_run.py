"""The direct-runner launcher (pipeline/run.py)."""
import os


def test_a_run_leaves_nothing_in_tmpdir():
  """TFX repackages itself (52 MB) into TMPDIR for every Beam component and never deletes it:
  a pipeline run gets a private TMPDIR, removed afterwards, which subprocesses inherit too."""
  import subprocess
  import sys
  import tempfile
  from tfx.utils import dependency_utils
  from carvision.pipeline import run
  with run.private_tmpdir() as tmp:
    flags = dependency_utils.make_beam_dependency_flags([])  # what each Beam executor does
    sdist = flags[-1].split('=', 1)[1]
    assert sdist.startswith(tmp + os.sep) and os.path.exists(sdist)
    child = subprocess.run([sys.executable, '-c', 'import tempfile; print(tempfile.gettempdir())'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert child == tmp
  assert not os.path.exists(tmp) and tempfile.gettempdir() != tmp

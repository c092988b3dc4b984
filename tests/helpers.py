"""What the tests share: paths and running the CLI as a user does (conftest.py holds only
fixtures and hooks)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
TINY = os.path.join(REPO, 'data', 'car_ads_tiny')  # = pipeline.config.SAMPLE_DIR (no TF import here)
SHARED_FULL = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'car_ads')
SHIPPED = os.path.join(REPO, 'models', 'car_ads')


def run_cli(*args, env=None, timeout=900):
  """`python -m carvision.pipeline.cli ARGS` from the repository, output captured as text."""
  return subprocess.run([sys.executable, '-m', 'carvision.pipeline.cli', *args], cwd=REPO,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout)

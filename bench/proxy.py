"""Ranks training recipes on the car_ads validation split, about 25 min an arm on 2 AVX-512
cores: the proxy recipe (bench/proxy.yaml) once per arm, each in its own pipeline root.

  scripts/env.sh run 'python bench/proxy.py --data ../shared/data/car_ads --arm base \
      --arm no_co_tuning:model.co_tuning=0 --arm wd05:model.stages.1.weight_decay=0.05'

An arm is NAME[:KEY=VALUE[;KEY=VALUE...]], config overrides on bench/proxy.yaml. An arm whose
result exists under --out is not run again (a stopped benchmark goes on; `carvision run`
resumes a stopped Trainer). One JSON line per arm: the Trainer's validation top-1 after each
stage and at the end (what ranks: the test split never chooses), and its training seconds.
The proxy keeps what the full run has (data, splits, classes, stages, sizes, augmentation,
Co-Tuning, export) and shortens the body to 8 epochs and the served-size stage to 1; its
ranking was checked against the full run's (BENCHMARKS.md, "The proxy benchmark").
"""
import argparse
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from carvision.components import names  # noqa: E402
from carvision.pipeline import config as config_lib  # noqa: E402
from carvision.pipeline import run as run_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, 'proxy.yaml')
NOT_BLESSED = 4  # carvision run's exit status when a gate did not bless (README)


def run_arm(name: str, sets, out: str, csv_path: str, images: str, recipe: str = RECIPE) -> dict:
  """One `carvision run` of the proxy recipe (or `recipe`) on a cars.csv export (not again
  once its summary is written); returns the summary. NOT BLESSED (exit 4) is a result here,
  not a failure."""
  root = os.path.join(out, name)
  sets = [f'pipeline.root={root}', f'pipeline.metadata={root}/metadata.sqlite',
          f'push.dir={root}/serving', f'ingest.csv={csv_path}',
          f'ingest.image_url_template={images}/{{p_hash}}.jpg', *sets]
  summary = os.path.join(out, f'{name}.summary.json')
  cmd = [sys.executable, '-m', 'carvision.pipeline.cli', 'run', '--config', recipe,
         '--summary-json', summary]
  for s in sets:
    cmd += ['--set', s]
  if not os.path.exists(summary):
    with open(os.path.join(out, f'{name}.log'), 'a', encoding='utf-8') as log:
      rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc not in (0, NOT_BLESSED):
      raise RuntimeError(f'arm {name}: carvision run exited {rc}; see {out}/{name}.log')
  with open(summary, encoding='utf-8') as f:
    return json.load(f)


def training_record(root: str) -> dict:
  """training.json of the arm's latest Trainer output."""
  paths = sorted(glob.glob(os.path.join(root, 'Trainer', 'model', '*', '**', names.TRAINING_JSON),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no {names.TRAINING_JSON} under {root}/Trainer')
  with open(paths[-1], encoding='utf-8') as f:
    return json.load(f)


def validation_figures(record: dict) -> dict:
  """Best validation top-1 of each stage, the final one, and the training time."""
  stages = record['history']['stages']
  per_stage = {k: round(max(v['val_class_top1']), 4) for k, v in stages.items()
               if isinstance(v, dict) and v.get('val_class_top1')}
  return {'validation_top1_by_stage': per_stage,
          'validation_top1': round(record['history']['validation']['class_top1'], 4),
          'train_seconds': round(record['history']['train_seconds'])}


def parse_arm(text: str):
  name, _, rest = text.partition(':')
  return name, [s for s in rest.split(';') if s]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--data', required=True, help='a car_ads directory (cars.csv, images/)')
  ap.add_argument('--arm', action='append', required=True, help='NAME[:KEY=VALUE;...]')
  ap.add_argument('--out', default=os.path.join(config_lib.REPO_ROOT, 'runs', 'bench', 'proxy'))
  args = ap.parse_args()
  data, out = os.path.abspath(args.data), os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  for name, sets in map(parse_arm, args.arm):
    result_path = os.path.join(out, f'{name}.result.json')
    if not os.path.exists(result_path):
      run_arm(name, sets, out, os.path.join(data, 'cars.csv'), os.path.join(data, 'images'))
      result = {'arm': name, 'set': sets, **validation_figures(training_record(os.path.join(out, name))),
                'code_version': run_lib.code_version(), 'machine': run_lib.machine()}
      with open(result_path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(result, f, indent=1)
      os.replace(result_path + '.tmp', result_path)
    with open(result_path, encoding='utf-8') as f:
      print(json.dumps(json.load(f)))


if __name__ == '__main__':
  main()

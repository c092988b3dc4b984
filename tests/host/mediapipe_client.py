"""A real client of the shipped file: MediaPipe Tasks' ImageClassifier (host Python).

Prints one JSON line: {photo path: [head name, top-1 label, its score, top-1 make or None]}. The labels come
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
      heads = {h.head_name: h for h in result.classifications}
      head = heads.get('probability', result.classifications[0])
      best = head.categories[0]
      make = heads.get('make_probability')  # the second head, in files that have one
      out[path] = [head.head_name, best.category_name, round(float(best.score), 6),
                   make.categories[0].category_name if make else None]
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])

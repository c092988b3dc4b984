"""Transform: label vocabularies and integer labels; photos pass through as JPEG bytes.

Decoding and resizing happen in the Trainer's tf.data pipeline and inside the
exported model, so TFRecords never hold float images and clients send raw JPEG
bytes (SavedModel) or uint8 pixels (TFLite).
"""
import tensorflow_transform as tft

from carvision.components import features as F


def preprocessing_fn(inputs):
  outputs = {F.IMAGE: inputs[F.IMAGE]}
  for key in F.BBOX + (F.BBOX_KNOWN, F.AD_ID, F.P_HASH):
    outputs[key] = inputs[key]
  for name in F.LABELS:
    raw = inputs[F.raw_label(name)]
    # Unseen labels (e.g. a class present only in eval) map to -1 and are not trained on.
    outputs[F.label_id(name)] = tft.compute_and_apply_vocabulary(
        raw, vocab_filename=F.vocab_name(name), default_value=-1)
    outputs[F.raw_label(name)] = raw
  return outputs

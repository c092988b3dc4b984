"""Exports: a SavedModel taking JPEG bytes, and int8 / fp16 TFLite taking uint8 pixels.

SavedModel signatures:
  serving_default(images: string[N] JPEG bytes) -> probabilities, top_k_labels, top_k_probabilities
  serve_examples(examples: serialized tf.Example) -> probabilities   (TFMA)
  transform_features(examples) -> transformed features incl. integer labels (TFMA labels)
  serve_pixels(pixels: uint8[1, H, W, 3]) -> probabilities            (the TFLite function)
Next to it, in `tflite/`: model.tflite (int8), model_fp16.tflite, labels.txt.
Every signature averages the configured test-time views (`model.serving_views`) inside
the graph, so the SavedModel, the TFLite files and the gates all judge the same model.
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from carvision.components import features as F
from carvision.components import files as files_lib
from carvision.components import images
from carvision.components import names
from carvision.components.trainer import model as M
from carvision.components.trainer import tflite_metadata

TOP_K = 5


def labels(tft_out, name: str = 'class') -> List[str]:
  return [v.decode() if isinstance(v, bytes) else v
          for v in tft_out.vocabulary_by_name(F.vocab_name(name))]


def ad_ids(patterns: List[str]) -> List[int]:
  """The distinct ad ids of the (GZIP TFRecord) examples in `patterns`, sorted."""
  spec = {F.AD_ID: tf.io.FixedLenFeature([1], tf.int64)}
  ds = tf.data.TFRecordDataset(files_lib.expand(patterns), compression_type='GZIP').batch(1024)
  out = set()
  for batch in ds:
    out.update(int(x) for x in tf.io.parse_example(batch, spec)[F.AD_ID].numpy().ravel())
  return sorted(out)


def write_seen_ads(tdir: str, train_patterns: List[str], validation_patterns: List[str],
                   inherited: Optional[Dict[str, set]] = None) -> None:
  """seen_ads.json: the ads that trained the model and the ads that chose it, so `evaluate`,
  `audit` and a warm start can keep every figure on ads the model has not seen. A warm start
  `inherited` what its source had seen: those ads are in the lists too."""
  seen = {'train': set(ad_ids(train_patterns)), 'validation': set(ad_ids(validation_patterns))}
  for split, ads in (inherited or {}).items():
    seen.setdefault(split, set()).update(ads)
  with tf.io.gfile.GFile(os.path.join(tdir, names.SEEN_ADS), 'w') as f:
    json.dump({k: sorted(v) for k, v in seen.items()}, f)


def _decode_batch(jpegs: tf.Tensor, size: int) -> tf.Tensor:
  return tf.map_fn(lambda j: images.decode_tf(j, size), jpegs, fn_output_signature=tf.uint8)


def export_all(full, tft_out, fn_args, cfg, history: Dict,
               inherited_seen: Optional[Dict[str, set]] = None) -> None:
  """The SavedModel signatures, the TFLite files, labels, serve.json and training.json;
  `cfg`: the Trainer's typed config (components.trainer.config.TrainerConfig)."""
  mc = cfg.model
  size = mc.image_size
  views = M.parse_views(mc.serving_views or ['full'])
  class_labels = labels(tft_out, 'class')
  label_table = tf.constant(class_labels)
  raw_spec = tft_out.raw_feature_spec()
  full.tft_layer = tft_out.transform_features_layer()

  def predict(pixels):
    out = M.predict_views(full, pixels, views)  # one forward pass for both heads
    probs = out[M.CLASS_OUT]
    top = tf.math.top_k(probs, k=min(TOP_K, len(class_labels)))
    return {'probabilities': probs, 'top_k_probabilities': top.values,
            'top_k_labels': tf.gather(label_table, top.indices),
            'make_probabilities': out[M.MAKE_OUT]}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='images')])
  def serve_jpeg(images):
    return predict(_decode_batch(images, size))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def serve_examples(examples):
    parsed = tf.io.parse_example(examples, {F.IMAGE: raw_spec[F.IMAGE]})
    jpegs = tf.reshape(parsed[F.IMAGE], [-1])
    return {'probabilities': M.predict_views(full, _decode_batch(jpegs, size), views)[M.CLASS_OUT]}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def transform_features(examples):
    parsed = tf.io.parse_example(examples, raw_spec)
    out = full.tft_layer(parsed)
    return {k: v for k, v in out.items() if k.startswith('label_')}

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name='pixels')])
  def serve_pixels(pixels):
    return {'probabilities': M.predict_views(full, pixels, views)[M.CLASS_OUT]}

  out_dir = fn_args.serving_model_dir
  full.save(out_dir, save_format='tf', include_optimizer=False, signatures={
      'serving_default': serve_jpeg, 'serve_examples': serve_examples,
      'transform_features': transform_features, 'serve_pixels': serve_pixels})
  tdir = os.path.join(out_dir, names.TFLITE_DIR)
  tf.io.gfile.makedirs(tdir)
  with tf.io.gfile.GFile(os.path.join(tdir, names.LABELS), 'w') as f:
    f.write('\n'.join(class_labels) + '\n')
  with tf.io.gfile.GFile(os.path.join(tdir, names.MAKE_LABELS), 'w') as f:
    f.write('\n'.join(labels(tft_out, 'make')) + '\n')
  if history.get('serve'):  # the decision's thresholds travel with the model
    with tf.io.gfile.GFile(os.path.join(tdir, names.SERVE), 'w') as f:
      json.dump(history['serve'], f, indent=1)
  write_seen_ads(tdir, fn_args.train_files, fn_args.eval_files, inherited_seen)
  spec = tft_out.transformed_feature_spec()
  # Quantisation ranges are fitted on train photos; which layers stay float is a choice,
  # so it is ranked on validation photos (never on the test split that the gates judge).
  rep = representative_pixels(fn_args.train_files, spec, size,
                              mc.tflite_representative_samples)
  debug = representative_pixels(fn_args.eval_files, spec, size, DEBUG_SAMPLES)
  float_layers = mc.tflite_float_layers
  tflite_int8, tflite_fp16, kept_float = to_tflite(full, size, rep, views,
                                                   float_layers=float_layers, debug=debug)
  blobs = {'int8': tflite_int8, 'fp16': tflite_fp16}
  fast = mc.fast_file and views != ['full']
  if fast:  # one backbone pass instead of len(views): the app's fast choice
    blobs['fast'], _, kept_fast = to_tflite(full, size, rep, ['full'], float_layers=float_layers,
                                            debug=debug, fp16=False)
  # What the exported files do inside (the Pusher copies this onto the model card).
  history = dict(history, serving={'views': views, 'int8_float_ops': FLOAT_OPS,
                                   'int8_float_layers': kept_float,
                                   'fast_file': {'views': ['full'],
                                                 'int8_float_layers': kept_fast} if fast else None})
  version = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  described = {}
  for kind, blob in blobs.items():
    described[kind] = tflite_metadata.embed(
        blob, class_labels, make_labels=labels(tft_out, 'make'),
        name=f"carvision {mc.backbone} ({kind})",
        description=('Car make|model|submodel from one photo. Input: the whole RGB photo '
                     f'bilinear-resized to {size}x{size}, uint8 0-255. Outputs: calibrated '
                     'probabilities of the classes (labels.txt order) and of the makes '
                     '(make_labels.txt order).'),
        version=version, license_text=cfg.license)
  for kind, name in (('int8', names.INT8), ('fp16', names.FP16), ('fast', names.FAST)):
    if kind in described:
      with tf.io.gfile.GFile(os.path.join(tdir, name), 'wb') as f:
        f.write(described[kind])
  with tf.io.gfile.GFile(os.path.join(tdir, names.TRAINING_JSON), 'w') as f:
    json.dump({'config': cfg.as_dict(), 'history': history, 'labels': len(class_labels),
               'exported_at': version}, f, indent=1)


def representative_pixels(patterns: List[str], spec: Dict, size: int, n: int) -> np.ndarray:
  """`n` photos of a split, preprocessed exactly as at serving time: the n with the smallest
  SHA-256 of their p_hash when the spec has it (the same photos whatever order ExampleGen
  wrote the records in), else the first n."""
  files = files_lib.expand(patterns)
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  if F.P_HASH in spec:
    name = {F.P_HASH: spec[F.P_HASH]}
    named = ds.map(lambda s: (tf.reshape(tf.io.parse_single_example(s, name)[F.P_HASH], [-1])[0], s),
                   num_parallel_calls=tf.data.AUTOTUNE)
    chosen = heapq.nsmallest(n, ((hashlib.sha256(p.numpy()).digest(), s.numpy()) for p, s in named),
                             key=lambda hs: hs[0])
    records = [s for _, s in chosen]
  else:
    records = [s.numpy() for s in ds.take(n)]
  out = []
  for s in records:
    f = tf.io.parse_single_example(s, spec)
    out.append(images.decode_tf(tf.reshape(f[F.IMAGE], [-1])[0], size).numpy())
  return np.stack(out)


FLOAT_OPS = ['FULLY_CONNECTED', 'SOFTMAX']  # the head stays float in the int8 model
DEBUG_SAMPLES = 64  # validation photos that rank the layers kept float


def quantisation_errors(debugger) -> List[Dict]:
  """Per quantised layer: RMSE between its int8 and float outputs in units of its int8 scale
  (QuantizationDebugger's layer statistics), largest first."""
  buf = io.StringIO()
  debugger.layer_statistics_dump(buf)
  buf.seek(0)
  rows = []
  for r in csv.DictReader(buf):
    scale = float(r['scale'] or 0)
    if scale > 0:
      rows.append({'layer': r['tensor_name'], 'op': r['op_name'],
                   'rmse_per_scale': float(np.sqrt(float(r['mean_squared_error'])) / scale)})
  return sorted(rows, key=lambda r: -r['rmse_per_scale'])


def to_tflite(full, size: int, rep: np.ndarray, views=('full',), float_layers: int = 0,
              debug: np.ndarray = None, fp16: bool = True):
  """(int8 bytes, fp16 bytes or None, the layers kept float); both take uint8 [1, size, size, 3]
  and output float probabilities: output 0 the classes (labels.txt), output 1 the makes
  (make_labels.txt).

  int8: selective quantisation with tf.lite.experimental.QuantizationDebugger. The head
  (FULLY_CONNECTED, SOFTMAX) stays float: an int8 softmax outputs multiples of 1/256, so
  close classes tie and the top-5 order is lost. With `float_layers` N, the N layers whose
  int8 outputs stray furthest from float on the `debug` photos (default: the first
  DEBUG_SAMPLES calibration photos) stay float too (in EfficientNet-Lite: the stem and the first depthwise convolutions).
  """
  from tensorflow.lite.python import util as tfl_util  # pylint: disable=g-import-not-at-top

  def heads(pixels):  # two outputs, in this order: class probabilities, make probabilities
    out = M.predict_views(full, pixels, views)
    return out[M.CLASS_OUT], out[M.MAKE_OUT]

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name='pixels')])
  def float_pixels(pixels):  # the int8 graph: the converter quantises this float input to uint8
    return heads(pixels)

  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name='pixels')])
  def uint8_pixels(pixels):
    return heads(pixels)

  # No trackable object: the converter then freezes the graph instead of first saving `full`
  # as a SavedModel, which took ~27 s of every conversion on 2 cores (8x; the same outputs on
  # the test model, BENCHMARKS.md). `full` stays referenced by the functions' closure.
  conv = tf.lite.TFLiteConverter.from_concrete_functions([float_pixels.get_concrete_function()])
  conv.optimizations = [tf.lite.Optimize.DEFAULT]

  def gen():
    # The extremes first so the input quantisation spans 0..255 exactly (scale 1, zero point 0).
    yield [np.zeros((1, size, size, 3), np.float32)]
    yield [np.full((1, size, size, 3), 255.0, np.float32)]
    for img in rep:
      yield [img[None].astype(np.float32)]

  def debug_gen():
    for img in (rep[:DEBUG_SAMPLES] if debug is None else debug):
      yield [img[None].astype(np.float32)]

  conv.representative_dataset = gen
  options = tf.lite.experimental.QuantizationDebugOptions
  debugger = tf.lite.experimental.QuantizationDebugger(
      converter=conv, debug_dataset=debug_gen, debug_options=options(denylisted_ops=FLOAT_OPS))
  kept = []
  if float_layers > 0:
    debugger.run()
    kept = quantisation_errors(debugger)[:float_layers]
    debugger.options = options(denylisted_ops=FLOAT_OPS,
                               denylisted_nodes=[k['layer'] for k in kept])
  # The debugger's model has float input; the phone contract is uint8 pixels.
  int8 = tfl_util.modify_model_io_type(debugger.get_nondebug_quantized_model(),
                                       inference_input_type=tf.uint8,
                                       inference_output_type=tf.float32)

  heads_out = full.get_layer('heads').output
  n_classes, n_makes = int(heads_out[M.CLASS_OUT].shape[-1]), int(heads_out[M.MAKE_OUT].shape[-1])
  half = None
  if fp16:
    conv16 = tf.lite.TFLiteConverter.from_concrete_functions([uint8_pixels.get_concrete_function()])
    conv16.optimizations = [tf.lite.Optimize.DEFAULT]
    conv16.target_spec.supported_types = [tf.float16]
    half = tflite_metadata.class_first(conv16.convert(), n_classes, n_makes)
  return tflite_metadata.class_first(int8, n_classes, n_makes), half, kept

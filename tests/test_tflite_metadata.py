"""TFLite metadata written without tflite-support reads back, and the model still runs."""
import numpy as np
import tensorflow as tf

from carvision.components.trainer import tflite_metadata


def _tiny_tflite(n_out=3, size=8):
  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name='pixels')])
  def f(pixels):
    x = tf.reduce_mean(tf.cast(pixels, tf.float32), axis=[1, 2])
    return tf.nn.softmax(tf.matmul(x, tf.ones([3, n_out])) / 100.0)
  return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()]).convert()


def test_labels_round_trip_and_model_still_runs(tmp_path):
  from ai_edge_litert.interpreter import Interpreter
  labels = ['BMW|X6|SUV 2012', 'Citroën|C4 Picasso|Minivan 2012', 'Škoda|Octavia|Combi 2012']
  raw = _tiny_tflite(len(labels))
  out = tflite_metadata.embed(raw, labels, name='t', description='d', version='v1')
  md = tflite_metadata.read(out)
  assert md['labels'] == labels
  assert md['output_files'] == ['labels.txt']
  assert (md['name'], md['version'], md['input'], md['output']) == ('t', 'v1', 'image', 'probability')
  interp = Interpreter(model_content=out)
  interp.allocate_tensors()
  inp = interp.get_input_details()[0]
  interp.set_tensor(inp['index'], np.full(inp['shape'], 7, np.uint8))
  interp.invoke()
  assert interp.get_tensor(interp.get_output_details()[0]['index']).shape == (1, len(labels))
  # Writing again into the file that already has metadata replaces it, does not stack it.
  twice = tflite_metadata.embed(out, labels[::-1], name='t', description='d', version='v2')
  again = tflite_metadata.read(twice)
  assert again['labels'] == labels[::-1] and again['version'] == 'v2'
  assert _metadata_entries(twice) == 1
  assert abs(len(twice) - len(out)) < 64  # the old metadata and label zip are gone


def _metadata_entries(model_bytes):
  from ai_edge_litert import schema_py_generated as schema
  m = schema.Model.GetRootAsModel(bytearray(model_bytes), 0)
  return sum(m.Metadata(i).Name() == b'TFLITE_METADATA' for i in range(m.MetadataLength()))


def _two_heads(n_classes, n_makes, size=8):
  @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.uint8, name='pixels')])
  def f(pixels):
    x = tf.reduce_mean(tf.cast(pixels, tf.float32), axis=[1, 2])
    return (tf.nn.softmax(tf.matmul(x, tf.ones([3, n_classes])) / 100.0),
            tf.nn.softmax(tf.matmul(x, tf.ones([3, n_makes])) / 100.0))
  return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()]).convert()


def test_two_heads_each_with_its_labels():
  import pytest
  classes, makes = ['Audi|A4|2012', 'Audi|A6|2011', 'BMW|X5|2007', 'BMW|M3|2012'], ['Audi', 'BMW']
  raw = _two_heads(len(classes), len(makes))
  md = tflite_metadata.read(tflite_metadata.embed(raw, classes, make_labels=makes, name='t',
                                                  description='d', version='v'))
  assert [(o['name'], o['files'], o['labels']) for o in md['outputs']] == [
      ('probability', ['labels.txt'], classes), ('make_probability', ['make_labels.txt'], makes)]
  with pytest.raises(ValueError, match='make_labels'):
    tflite_metadata.embed(raw, classes, name='t', description='d', version='v')
  with pytest.raises(ValueError, match='output 1'):
    tflite_metadata.embed(raw, classes, make_labels=makes[:1], name='t', description='d',
                          version='v')


def test_label_count_must_match_output():
  import pytest
  with pytest.raises(ValueError, match='labels'):
    tflite_metadata.embed(_tiny_tflite(3), ['a', 'b'], name='t', description='d', version='v')

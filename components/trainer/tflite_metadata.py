"""Standard TFLite model metadata (the `TFLITE_METADATA` buffer + associated files).

What tflite-support's MetadataPopulator writes, for an image classifier: model name,
description, version, input = RGB image uint8 0..255 (no normalisation outside the
model), output = probabilities with `labels.txt` attached as TENSOR_AXIS_LABELS, the
file packed into the model as a zip appended after the flatbuffer. Readers (Task
Library, Android Studio, tflite-support's MetadataDisplayer) find both. tflite-support
has no Python 3.13 build, so the schema classes are vendored (components/third_party)
and the model flatbuffer classes come from ai-edge-litert.
"""
from __future__ import annotations

import io
import zipfile
from typing import Dict, List

import flatbuffers

from components.third_party import tflite_metadata_schema_py_generated as meta_fb
from components import names

METADATA_FIELD_NAME = 'TFLITE_METADATA'
MODEL_IDENTIFIER = b'TFL3'
METADATA_IDENTIFIER = b'M001'
# What tflite-support 0.4.4's GetMinimumMetadataParserVersion returns for this content
# (image properties, normalisation, stats, an associated label file).
MIN_PARSER_VERSION = '1.0.0'
LABELS_FILE = names.LABELS


def _schema():
  from ai_edge_litert import schema_py_generated  # pylint: disable=g-import-not-at-top
  return schema_py_generated


def _metadata_buffer(name: str, description: str, version: str, author: str,
                     license_text: str, height: int, width: int, n_labels: int) -> bytes:
  image = meta_fb.TensorMetadataT()
  image.name = 'image'
  image.description = (f'The whole RGB photo, bilinear-resized to {width}x{height}, '
                       'uint8 0-255; normalisation is inside the model.')
  image.content = meta_fb.ContentT()
  image.content.contentPropertiesType = meta_fb.ContentProperties.ImageProperties
  props = meta_fb.ImagePropertiesT()
  props.colorSpace = meta_fb.ColorSpaceType.RGB
  image.content.contentProperties = props
  norm = meta_fb.ProcessUnitT()
  norm.optionsType = meta_fb.ProcessUnitOptions.NormalizationOptions
  norm.options = meta_fb.NormalizationOptionsT()
  norm.options.mean, norm.options.std = [0.0], [1.0]
  image.processUnits = [norm]
  image.stats = meta_fb.StatsT()
  image.stats.max, image.stats.min = [255.0], [0.0]

  probs = meta_fb.TensorMetadataT()
  probs.name = 'probability'
  probs.description = f'Probabilities of the {n_labels} make|model|submodel classes.'
  probs.content = meta_fb.ContentT()
  probs.content.contentPropertiesType = meta_fb.ContentProperties.FeatureProperties
  probs.content.contentProperties = meta_fb.FeaturePropertiesT()
  probs.stats = meta_fb.StatsT()
  probs.stats.max, probs.stats.min = [1.0], [0.0]
  labels = meta_fb.AssociatedFileT()
  labels.name = LABELS_FILE
  labels.description = 'make|model|submodel, one per output index.'
  labels.type = meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS
  probs.associatedFiles = [labels]

  graph = meta_fb.SubGraphMetadataT()
  graph.inputTensorMetadata = [image]
  graph.outputTensorMetadata = [probs]
  model = meta_fb.ModelMetadataT()
  model.name, model.description, model.version = name, description, version
  model.author, model.license = author, license_text
  model.subgraphMetadata = [graph]
  model.minParserVersion = MIN_PARSER_VERSION
  b = flatbuffers.Builder(0)
  b.Finish(model.Pack(b), METADATA_IDENTIFIER)
  return bytes(b.Output())


def embed(model_bytes: bytes, labels: List[str], *, name: str, description: str,
          version: str, author: str = 'carvision', license_text: str = '') -> bytes:
  """Returns the model with metadata and `labels.txt` packed in (input left untouched)."""
  schema = _schema()
  model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(model_bytes), 0))
  if len(model.subgraphs[0].inputs) != 1 or len(model.subgraphs[0].outputs) != 1:
    raise ValueError('expected one input (pixels) and one output (probabilities)')
  shape = list(model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].shape)
  out_shape = list(model.subgraphs[0].tensors[model.subgraphs[0].outputs[0]].shape)
  if out_shape[-1] != len(labels):
    raise ValueError(f'{len(labels)} labels for an output of shape {out_shape}')
  buf = schema.BufferT()
  buf.data = list(_metadata_buffer(name, description, version, author, license_text,
                                   int(shape[1]), int(shape[2]), len(labels)))
  model.buffers = (model.buffers or []) + [buf]
  field = schema.MetadataT()
  field.name, field.buffer = METADATA_FIELD_NAME, len(model.buffers) - 1
  model.metadata = [m for m in (model.metadata or [])
                    if m.name not in (METADATA_FIELD_NAME, METADATA_FIELD_NAME.encode())] + [field]
  b = flatbuffers.Builder(0)
  b.Finish(model.Pack(b), MODEL_IDENTIFIER)
  out = io.BytesIO(bytes(b.Output()))
  out.seek(0, io.SEEK_END)
  with zipfile.ZipFile(out, 'a') as zf:  # associated files: a zip after the flatbuffer
    zf.writestr(LABELS_FILE, '\n'.join(labels) + '\n')
  return out.getvalue()


def read(model_bytes: bytes) -> Dict:
  """Reads back what `embed` wrote: name, version, input/output names, packed labels."""
  schema = _schema()
  model = schema.Model.GetRootAsModel(bytearray(model_bytes), 0)
  meta_buf = None
  for i in range(model.MetadataLength()):
    m = model.Metadata(i)
    if m.Name().decode() == METADATA_FIELD_NAME:
      meta_buf = model.Buffers(m.Buffer()).DataAsNumpy().tobytes()
  if meta_buf is None:
    raise ValueError('no TFLITE_METADATA in this model')
  if not meta_fb.ModelMetadata.ModelMetadataBufferHasIdentifier(meta_buf, 0):
    raise ValueError('metadata buffer lacks the M001 identifier')
  md = meta_fb.ModelMetadataT.InitFromObj(meta_fb.ModelMetadata.GetRootAsModelMetadata(meta_buf, 0))
  graph = md.subgraphMetadata[0]
  files = {}
  with zipfile.ZipFile(io.BytesIO(model_bytes)) as zf:
    for n in zf.namelist():
      files[n] = zf.read(n).decode()
  out_files = [f.name.decode() for f in graph.outputTensorMetadata[0].associatedFiles or []]
  return {'name': md.name.decode(), 'version': md.version.decode(),
          'description': md.description.decode(),
          'license': (md.license or b'').decode(),
          'min_parser_version': md.minParserVersion.decode(),
          'input': graph.inputTensorMetadata[0].name.decode(),
          'output': graph.outputTensorMetadata[0].name.decode(),
          'output_files': out_files,
          'labels': files.get(LABELS_FILE, '').splitlines()}

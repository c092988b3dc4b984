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
from typing import Dict, List, Optional

import flatbuffers

from carvision.components.third_party import tflite_metadata_schema_py_generated as meta_fb
from carvision.components import names

METADATA_FIELD_NAME = 'TFLITE_METADATA'
MODEL_IDENTIFIER = b'TFL3'
METADATA_IDENTIFIER = b'M001'
# What tflite-support 0.4.4's GetMinimumMetadataParserVersion returns for this content
# (image properties, normalisation, stats, an associated label file).
MIN_PARSER_VERSION = '1.0.0'
LABELS_FILE = names.LABELS
MAKE_LABELS_FILE = names.MAKE_LABELS


def _schema():
  from ai_edge_litert import schema_py_generated  # pylint: disable=g-import-not-at-top
  return schema_py_generated


def _probabilities(name: str, description: str, label_file: str, label_text: str):
  out = meta_fb.TensorMetadataT()
  out.name = name
  out.description = description
  out.content = meta_fb.ContentT()
  out.content.contentPropertiesType = meta_fb.ContentProperties.FeatureProperties
  out.content.contentProperties = meta_fb.FeaturePropertiesT()
  out.stats = meta_fb.StatsT()
  out.stats.max, out.stats.min = [1.0], [0.0]
  labels = meta_fb.AssociatedFileT()
  labels.name = label_file
  labels.description = label_text
  labels.type = meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS
  out.associatedFiles = [labels]
  return out


def _metadata_buffer(name: str, description: str, version: str, author: str,
                     license_text: str, height: int, width: int, n_labels: int,
                     n_makes: int = 0) -> bytes:
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

  outputs = [_probabilities('probability',
                            f'Probabilities of the {n_labels} make|model|submodel classes.',
                            LABELS_FILE, 'make|model|submodel, one per output index.')]
  if n_makes:
    outputs.append(_probabilities('make_probability', f'Probabilities of the {n_makes} makes.',
                                  MAKE_LABELS_FILE, 'make, one per output index.'))

  graph = meta_fb.SubGraphMetadataT()
  graph.inputTensorMetadata = [image]
  graph.outputTensorMetadata = outputs
  model = meta_fb.ModelMetadataT()
  model.name, model.description, model.version = name, description, version
  model.author, model.license = author, license_text
  model.subgraphMetadata = [graph]
  model.minParserVersion = MIN_PARSER_VERSION
  b = flatbuffers.Builder(0)
  b.Finish(model.Pack(b), METADATA_IDENTIFIER)
  return bytes(b.Output())


def embed(model_bytes: bytes, labels: List[str], *, name: str, description: str,
          version: str, author: str = 'carvision', license_text: str = '',
          make_labels: Optional[List[str]] = None) -> bytes:
  """Returns the model with metadata and its label files packed in (input left untouched).

  One output: class probabilities (`labels.txt`). Two outputs: class, then make
  probabilities (`make_labels.txt`); a client such as MediaPipe's ImageClassifier then
  returns both heads by name. Metadata already in the model is replaced, not stacked.
  """
  schema = _schema()
  model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(model_bytes), 0))
  graph = model.subgraphs[0]
  heads = [labels] + ([make_labels] if len(graph.outputs) == 2 else [])
  if len(graph.inputs) != 1 or len(graph.outputs) not in (1, 2):
    raise ValueError('expected one input (pixels) and one or two outputs (class, make)')
  if len(heads) == 2 and make_labels is None:
    raise ValueError('a model with two outputs needs make_labels for the second')
  if len(heads) == 2:
    graph.outputs = _class_first(model, graph, len(labels), len(heads[1]))
  shape = list(graph.tensors[graph.inputs[0]].shape)
  for i, head in enumerate(heads):
    out_shape = list(graph.tensors[graph.outputs[i]].shape)
    if out_shape[-1] != len(head):
      raise ValueError(f'{len(head)} labels for output {i} of shape {out_shape}')
  # replace a previous metadata buffer instead of keeping it beside the new one
  old = [m.buffer for m in (model.metadata or [])
         if m.name in (METADATA_FIELD_NAME, METADATA_FIELD_NAME.encode())]
  for i in old:
    model.buffers[i].data = []
  buf = schema.BufferT()
  buf.data = list(_metadata_buffer(name, description, version, author, license_text,
                                   int(shape[1]), int(shape[2]), len(labels),
                                   len(heads[1]) if len(heads) == 2 else 0))
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
    if len(heads) == 2:
      zf.writestr(MAKE_LABELS_FILE, '\n'.join(heads[1]) + '\n')
  return out.getvalue()


def _class_first(model, graph, n_classes: int, n_makes: int) -> List[int]:
  """The subgraph's two outputs ordered (class, make). The converter does not keep the
  order the exported function returns them in; its signature does name them
  (`output_0` = class, `output_1` = make), else the sizes tell them apart."""
  outs = list(graph.outputs)
  for sig in model.signatureDefs or []:
    named = {(o.name.decode() if isinstance(o.name, bytes) else o.name): o.tensorIndex
             for o in sig.outputs or []}
    if {'output_0', 'output_1'} <= set(named) and set(named.values()) == set(outs):
      return [named['output_0'], named['output_1']]
  sizes = [int(graph.tensors[i].shape[-1]) for i in outs]
  if n_classes != n_makes and sorted(sizes) == sorted([n_classes, n_makes]):
    return outs if sizes[0] == n_classes else outs[::-1]
  return outs


def class_first(model_bytes: bytes, n_classes: int, n_makes: int) -> bytes:
  """The model with its outputs ordered (class, make): what clients and the metadata expect."""
  schema = _schema()
  model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(model_bytes), 0))
  graph = model.subgraphs[0]
  order = _class_first(model, graph, n_classes, n_makes)
  if order == list(graph.outputs):
    return model_bytes
  graph.outputs = order
  b = flatbuffers.Builder(0)
  b.Finish(model.Pack(b), MODEL_IDENTIFIER)
  return bytes(b.Output())


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
  outputs = []
  for t in graph.outputTensorMetadata:
    files_of = [f.name.decode() for f in t.associatedFiles or []]
    outputs.append({'name': t.name.decode(), 'files': files_of,
                    'labels': files.get(files_of[0], '').splitlines() if files_of else []})
  return {'name': md.name.decode(), 'version': md.version.decode(), 'outputs': outputs,
          'description': md.description.decode(),
          'license': (md.license or b'').decode(),
          'min_parser_version': md.minParserVersion.decode(),
          'input': graph.inputTensorMetadata[0].name.decode(),
          'output': graph.outputTensorMetadata[0].name.decode(),
          'output_files': out_files,
          'labels': files.get(LABELS_FILE, '').splitlines()}

"""Cross-check: the metadata we write is read by the official tflite-support (Python 3.11 only).

  python3 -m venv /tmp/tfls && /tmp/tfls/bin/pip install tflite-support==0.4.4   # + apt libusb-1.0-0
  /tmp/tfls/bin/python tests/reference/check_tflite_metadata.py runs/.../model.tflite

Prints the metadata JSON, the packed files and the minimum parser version that
tflite-support computes (components/trainer/tflite_metadata.py hard-codes it: 1.0.0).
"""
import sys

from tensorflow_lite_support.metadata.cc.python import _pywrap_metadata_version
from tflite_support import metadata

d = metadata.MetadataDisplayer.with_model_file(sys.argv[1])
print(d.get_metadata_json())
print('packed files:', d.get_packed_associated_file_list())
print('labels:', len(d.get_associated_file_buffer('labels.txt').decode().splitlines()))
print('min parser version:', _pywrap_metadata_version.GetMinimumMetadataParserVersion(
    bytes(d.get_metadata_buffer())))

"""The stderr filter of quiet mode: library records that need no action go with their
continuation lines; everything else, errors included, passes."""
import os

from carvision.pipeline import quiet

# As TensorFlow printed it six times at the export of every model.early_learning run of
# 2026-12-04: three lines, the last two without a record prefix.
SERIALIZING = [b'WARNING:tensorflow:Issue encountered when serializing table_initializer.',
               b"Type is unsupported, or the types of the items don't match field type in "
               b'CollectionDef. Note this is a warning and probably safe to ignore.',
               b"'NoneType' object has no attribute 'name'"]


def _through_filter(lines):
  read, write = os.pipe()
  f = quiet.StderrFilter()
  f.saved = write
  try:
    f._emit(lines)  # pylint: disable=protected-access
  finally:
    os.close(write)
  with os.fdopen(read, 'rb') as r:
    return r.read().decode().splitlines(), f.dropped


def test_a_dropped_record_takes_its_continuation_lines_and_nothing_after():
  shown, dropped = _through_filter(
      [b'[carvision] Trainer: stage fixres epoch 2/2, stage done', *SERIALIZING,
       b'ERROR:absl:a real error', b'  its detail', *SERIALIZING,
       b'[carvision] Trainer done in 48 min 21 s'])
  assert shown == ['[carvision] Trainer: stage fixres epoch 2/2, stage done',
                   'ERROR:absl:a real error', '  its detail', '[carvision] Trainer done in 48 min 21 s']
  assert dropped == 2 * len(SERIALIZING)

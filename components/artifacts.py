"""carvision's own artifact types, shared by the components that write and read them."""
from tfx import types


class DeadLetters(types.Artifact):
  """Rows that did not become examples: JSON lines (ad_id, p_hash, reason, detail) + summary.json."""
  TYPE_NAME = 'carvision.DeadLetters'

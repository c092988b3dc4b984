"""Feature and split names shared by ingestion, Transform, Trainer and serving (one place to change)."""
IMAGE = 'image/encoded'
FORMAT = 'image/format'
HEIGHT = 'image/height'
WIDTH = 'image/width'
BBOX = ('image/object/bbox/ymin', 'image/object/bbox/xmin',
        'image/object/bbox/ymax', 'image/object/bbox/xmax')
BBOX_KNOWN = 'image/object/bbox/known'
LABELS = ('make', 'model', 'submodel', 'class')
AD_ID = 'ad_id'      # the split key (hash buckets) and the per-ad aggregation key
P_HASH = 'p_hash'    # the photo's name on the photo host


def raw_label(name: str) -> str:
  return f'label/{name}'


def label_id(name: str) -> str:
  """Transformed integer label (index into the `label_<name>` vocabulary)."""
  return f'label_{name}_id'


def vocab_name(name: str) -> str:
  return f'label_{name}'


# The three ExampleGen splits (hash buckets of ad_id) and what each one is for; the model
# card copies this.
TRAIN, VALIDATION, TEST = 'train', 'validation', 'test'
SPLIT_ROLES = {
    TRAIN: 'fits the weights',
    VALIDATION: 'chooses: early stopping, stage roll-back, the warm-start bar, the int8 '
                'layers kept float',
    TEST: 'judges: both deploy gates and every reported figure; never opened by the Trainer',
}

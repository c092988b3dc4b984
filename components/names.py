"""File, directory and label names shared by the Trainer, the gates, the Pusher, serving
and the command line: each spelled here once."""
SERVING_DIR = 'Format-Serving'   # the serving model inside a TFX Trainer's Model artifact
TFLITE_DIR = 'tflite'            # beside the SavedModel in a serving model directory
INT8 = 'model.tflite'            # the file that ships
FP16 = 'model_fp16.tflite'
FAST = 'model_fast.tflite'       # int8, one view (the full photo): the fast choice
LABELS = 'labels.txt'            # one make|model|submodel per output index
MAKE_LABELS = 'make_labels.txt'  # one make per index of the make head
SERVE = 'serve.json'             # thresholds of the class / make / not-sure decision
SEEN_ADS = 'seen_ads.json'       # the ads whose photos trained (train) or chose (validation) the model
WARM_START = 'warm_start.npz'   # the float16 weights a later run continues from (no graph)
TRAINING_JSON = 'training.json'  # the Trainer's record (config, history, what it read)
MODEL_CARD = 'model_card.json'
METRICS_JSON = 'metrics.json'    # the int8 gate's figures and verdicts (TFLiteEvaluator output)
REPORT_HTML = 'report.html'      # the gate's report (and its figures below)
REPORT_PNG = 'report.png'        # per-make accuracy
RISK_COVERAGE_PNG = 'risk_coverage.png'
PUSHED_SAVED_MODEL = 'saved_model'
CLASS_SEP = '|'                  # make|model|submodel
TARGET_PRECISION = 0.95          # default precision of class / make answers (serve.target_precision)


def split_label(label: str):
  """`make|model|submodel` -> (make, model, submodel), '' for any missing part."""
  return tuple((label.split(CLASS_SEP) + ['', '', ''])[:3])

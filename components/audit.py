"""The label audit: which ads' photos contradict the make / model / submodel the seller typed.

Numpy and cleanlab only (no TensorFlow): scores come from a pushed TFLite model's calibrated
class probabilities. Per ad, the photos are combined as independent views of one car
(their log-probabilities summed: three photos that each lean to another model say more
than one), and the listing is scored by cleanlab's label-quality score of the listed class
on that combined posterior: `score` = 1 - quality, higher = more likely mislabelled. What
the photos say (class, make with their probabilities) and the kind of disagreement come
from the taxonomy (make | model | submodel).

Ads the model cannot judge (no usable photo, a listed class it does not know) are kept with
a reason and no score, ranked after every judged ad.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from carvision.components import decision, names

AGREES = 'agrees'
NOT_SURE = 'not_sure'
OTHER_MAKE = 'other_make'
OTHER_MODEL = 'same_make_other_model'
OTHER_SUBMODEL = 'same_model_other_submodel'
KINDS = (OTHER_MAKE, OTHER_MODEL, OTHER_SUBMODEL, NOT_SURE, AGREES)

# Methods the benchmark compares (bench/audit_noise.py); METHOD is the one chosen there on
# the validation split.
METHODS = ('mean_self_confidence', 'product_self_confidence', 'product_self_confidence_adjusted',
           'product_normalized_margin')
METHOD = 'product_self_confidence'
SURE = 0.5  # a disagreement is named only when the photos' other class is this probable


@dataclasses.dataclass
class AdVerdict:
  ad_id: int
  listed: str                        # make|model|submodel as listed
  photos: int                        # photos scored
  score: Optional[float] = None      # higher = more likely mislabelled (None: not judged)
  listed_probability: Optional[float] = None
  predicted: Optional[str] = None    # what the photos say: the most probable class
  predicted_probability: Optional[float] = None
  predicted_make: Optional[str] = None
  predicted_make_probability: Optional[float] = None
  listed_make_probability: Optional[float] = None
  kind: Optional[str] = None
  reason: Optional[str] = None       # why the ad could not be judged
  p_hashes: List[str] = dataclasses.field(default_factory=list)

  def row(self) -> Dict:
    make, model, submodel = names.split_label(self.listed)
    pm, pmo, ps = names.split_label(self.predicted or '')
    r = lambda v: None if v is None else round(float(v), 6)  # noqa: E731
    return {'ad_id': self.ad_id, 'score': r(self.score), 'kind': self.kind or '',
            'listed_make': make, 'listed_model': model, 'listed_submodel': submodel,
            'listed_probability': r(self.listed_probability),
            'photos_say_make': pm or '', 'photos_say_model': pmo or '',
            'photos_say_submodel': ps or '', 'photos_say_probability': r(self.predicted_probability),
            'photos_say_make_only': self.predicted_make or '',
            'make_probability': r(self.predicted_make_probability),
            'listed_make_probability': r(self.listed_make_probability),
            'photos': self.photos, 'reason': self.reason or '',
            'p_hashes': ','.join(self.p_hashes)}


def combine(photo_probs: np.ndarray, method: str = METHOD) -> np.ndarray:
  """One ad's class posterior from its photos' calibrated probabilities [photos, classes]."""
  if method.startswith('mean'):
    return photo_probs.mean(axis=0)
  logp = np.log(np.clip(photo_probs.astype(np.float64), 1e-9, 1.0)).sum(axis=0)
  logp -= logp.max()
  p = np.exp(logp)
  return p / p.sum()


def listing_scores(ad_probs: np.ndarray, listed: np.ndarray, method: str = METHOD) -> np.ndarray:
  """[ads] scores, higher = the listed class less likely right: 1 - cleanlab's label quality
  (self_confidence = p(listed); normalized_margin = p(listed) - max other, rescaled)."""
  from cleanlab.rank import get_label_quality_scores  # pylint: disable=g-import-not-at-top
  quality_method = method.split('_', 1)[1]
  adjust = quality_method.endswith('_adjusted')  # confident learning's per-class thresholds
  quality_method = quality_method.replace('_adjusted', '')
  if not len(listed):
    return np.zeros(0)
  quality = get_label_quality_scores(listed, ad_probs, method=quality_method,
                                     adjust_pred_probs=adjust)
  return 1.0 - np.asarray(quality, dtype=np.float64)


def kind_of(listed: str, predicted: str, predicted_probability: float,
            listed_make_probability: float) -> str:
  """The taxonomy of a disagreement: another make, a sibling model, a sibling submodel
  (often a year or a body); `not_sure` when the photos' other class is not probable."""
  if predicted == listed:
    return AGREES
  if predicted_probability < SURE:
    return NOT_SURE
  lm, lmo, _ = names.split_label(listed)
  pm, pmo, _ = names.split_label(predicted)
  if pm != lm:
    return OTHER_MAKE if listed_make_probability < SURE else OTHER_MODEL
  return OTHER_MODEL if pmo != lmo else OTHER_SUBMODEL


def judge(ads: Dict[int, Dict], probs: Dict[str, np.ndarray], labels: Sequence[str],
          method: str = METHOD) -> List[AdVerdict]:
  """`ads`: ad_id -> {'listed': class, 'p_hashes': [...], 'reasons': {p_hash: reason}};
  `probs`: p_hash -> the photo's class probabilities. Returns every ad, ranked."""
  index = {l: i for i, l in enumerate(labels)}
  verdicts, judged, ad_probs, listed_idx = [], [], [], []
  for ad_id, ad in sorted(ads.items()):
    scored = [h for h in ad['p_hashes'] if h in probs]
    v = AdVerdict(ad_id=ad_id, listed=ad['listed'], photos=len(scored), p_hashes=scored)
    verdicts.append(v)
    if not ad['listed'] or ad['listed'].count(names.CLASS_SEP) != 2:
      v.reason = ad.get('label_reason') or 'no listed make/model/submodel'
      continue
    if not scored:
      counts = collections.Counter(ad.get('reasons', {}).values())
      v.reason = 'no usable photo' + (': ' + ', '.join(f'{k} {n}' for k, n in sorted(counts.items()))
                                      if counts else '')
      continue
    p = combine(np.stack([probs[h] for h in scored]), method)
    best = int(np.argmax(p))
    make_names, make_p = decision.make_probabilities(p[None], labels)
    makes = dict(zip(make_names, make_p[0].tolist()))
    top_make = max(makes, key=makes.get)
    v.predicted, v.predicted_probability = labels[best], float(p[best])
    v.predicted_make, v.predicted_make_probability = top_make, makes[top_make]
    v.listed_make_probability = makes.get(names.split_label(ad['listed'])[0], 0.0)
    if ad['listed'] not in index:
      v.reason = 'class unknown to the model (it cannot say whether the listing is right)'
      continue
    v.listed_probability = float(p[index[ad['listed']]])
    v.kind = kind_of(ad['listed'], v.predicted, v.predicted_probability,
                     v.listed_make_probability)
    judged.append(v)
    ad_probs.append(p)
    listed_idx.append(index[ad['listed']])
  if judged:
    scores = listing_scores(np.stack(ad_probs), np.array(listed_idx), method)
    for v, s in zip(judged, scores):
      v.score = float(s)
  return sorted(verdicts, key=lambda v: (v.score is None, -(v.score or 0.0), v.ad_id))

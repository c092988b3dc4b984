#!/usr/bin/env bash
# A real phone-side client reads the shipped model: MediaPipe Tasks' ImageClassifier (in a
# small venv of its own on the host's Python, pinned below, cached) must return labels from
# the TFLite metadata and the same top-1 as carvision's LiteRT path on the embedded sample.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
MODEL="$REPO/models/car_ads/model.tflite"
[ -f "$MODEL" ] || { echo "[host] mediapipe: no shipped model, skipped"; exit 0; }
PINS="mediapipe==1.2.2"
CACHE=${CARVISION_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/carvision}
VENV="$CACHE/host-mediapipe-$(printf %s "$PINS" | sha256sum | cut -c1-12)"
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"; python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q $PINS >"$CACHE/host-mediapipe.log" 2>&1 || {
    tail -5 "$CACHE/host-mediapipe.log"; echo "FAIL: could not install $PINS"; exit 1; }
  touch "$VENV/.complete"
fi
work=$(mktemp -d /tmp/carvision-mp-XXXX); trap 'rm -rf "$work"' EXIT
# 24 readable photos of the sample (labels.csv: car photos whose file is fine)
mapfile -t photos < <(awk -F, 'NR==1{for(i=1;i<=NF;i++)c[$i]=i; next}
  $c["is_car"]=="true" && $c["file_ok"]=="true" {print $c["p_hash"]}' \
  "$REPO/data/car_ads_tiny/labels.csv" | sort -u | sed -n 1,24p | sed "s|.*|$REPO/data/car_ads_tiny/images/&.jpg|")
"$REPO/bin/carvision" predict --json --top-k 1 "${photos[@]}" >"$work/litert.json" 2>"$work/err" || {
  tail -3 "$work/err"; echo "FAIL: carvision predict"; exit 1; }
"$VENV/bin/python" "$REPO/tests/host/mediapipe_client.py" "$MODEL" "${photos[@]}" >"$work/mp.json" 2>"$work/mp.err" || {
  tail -5 "$work/mp.err"; echo "FAIL: MediaPipe could not run the shipped file"; exit 1; }
python3 - "$work/litert.json" "$work/mp.json" "$REPO/models/car_ads/labels.txt" <<'PY'
import json, sys
litert = {o['input']: o['top_k'][0]['label'] for o in json.load(open(sys.argv[1]))}
mp = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
labels = set(open(sys.argv[3]).read().split('\n')) - {''}
assert set(mp) == set(litert), 'not the same photos'
assert all(v[1] in labels for v in mp.values()), 'MediaPipe returned a name not in labels.txt'
makes = {v[3] for v in mp.values()} - {None}
if makes:  # a file with the make head: its names come from make_labels.txt in the metadata
  import os
  known = set(open(os.path.join(os.path.dirname(sys.argv[3]), 'make_labels.txt')).read().split('\n'))
  assert makes <= known, makes - known
  print(f'[host] mediapipe: the make head by name on {len(mp)} photos')
same = sum(mp[p][1] == litert[p] for p in mp)
print(f'[host] mediapipe ImageClassifier: labels from the metadata, top-1 equal to LiteRT on {same}/{len(mp)} photos')
assert same == len(mp), {p: (mp[p][1], litert[p]) for p in mp if mp[p][1] != litert[p]}
PY

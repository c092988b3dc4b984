#!/usr/bin/env bash
# A phone team's install: `pip install carvision` (the client set: LiteRT, Pillow, NumPy; no
# TensorFlow) into a venv of the host's own Python, without root, pinned by requirements.lock
# as constraints. Its `carvision predict` on the shipped model must give the answers of the
# project environment's, start without TensorFlow and print nothing but answers.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
MODEL="$REPO/models/car_ads"
[ -f "$MODEL/model.tflite" ] || { echo "[host] client install: no shipped model, skipped"; exit 0; }
CACHE=${CARVISION_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/carvision}
mkdir -p "$CACHE"
key=$(cat "$REPO/setup.py" "$REPO/requirements.lock" | sha256sum | cut -c1-12)
VENV="$CACHE/host-client-$key"
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"; python3 -m venv "$VENV"
  # a copy: building in the repository would leave build/ and *.egg-info behind
  src=$(mktemp -d /tmp/carvision-src-XXXX)
  cp -r "$REPO/setup.py" "$REPO/requirements.in" "$REPO/README.md" "$REPO/carvision" "$REPO/pipeline" "$REPO/components" \
    "$REPO/configs" "$REPO/schemas" "$src/"
  "$VENV/bin/pip" install -q -c "$REPO/requirements.lock" "$src" >"$CACHE/host-client.log" 2>&1 || {
    tail -5 "$CACHE/host-client.log"; rm -rf "$src"; echo "FAIL: pip install carvision (client)"; exit 1; }
  rm -rf "$src"
  touch "$VENV/.complete"
fi
"$VENV/bin/carvision" --version | grep -qx 'carvision [0-9][0-9.a-z]*' || { echo "FAIL: carvision --version"; exit 1; }
"$VENV/bin/python" -I - <<'PY' || { echo "FAIL: the install's namespace"; exit 1; }
import importlib.util, carvision.pipeline, carvision.components.names
for top in ('pipeline', 'components'):  # only inside the carvision namespace
  assert importlib.util.find_spec(top) is None, f'pip install put a top-level {top!r} package in'
PY
if "$VENV/bin/python" -c 'import tensorflow' 2>/dev/null; then
  echo "FAIL: the client install pulled TensorFlow in"; exit 1
fi
work=$(mktemp -d /tmp/carvision-client-XXXX); trap 'rm -rf "$work"' EXIT
mapfile -t photos < <(awk -F, 'NR==1{for(i=1;i<=NF;i++)c[$i]=i; next}
  $c["is_car"]=="true" && $c["file_ok"]=="true" {print $c["p_hash"]}' \
  "$REPO/data/car_ads_tiny/labels.csv" | sort -u | sed -n 1,12p | sed "s|.*|$REPO/data/car_ads_tiny/images/&.jpg|")
(cd "$work" && "$VENV/bin/carvision" predict --model "$MODEL" --json --top-k 3 "${photos[@]}") \
  >"$work/client.json" 2>"$work/client.err" || { tail -5 "$work/client.err"; echo "FAIL: client predict"; exit 1; }
if grep -v '^note: ' "$work/client.err" | grep -q .; then
  cat "$work/client.err"; echo "FAIL: client predict printed more than notes on stderr"; exit 1
fi
"$REPO/bin/carvision" predict --model "$MODEL" --json --top-k 3 "${photos[@]}" >"$work/env.json" 2>"$work/env.err" || {
  tail -3 "$work/env.err"; echo "FAIL: carvision predict in the environment"; exit 1; }
python3 - "$work/client.json" "$work/env.json" "$("$VENV/bin/python" -V 2>&1)" <<'PY'
import json, sys
client, env = (json.loads(open(p).read()) for p in sys.argv[1:3])
assert len(client) == len(env) == 12, (len(client), len(env))
assert client == env, 'the client install answers differently from the environment'
print(f'[host] client install ({sys.argv[3]}, no TensorFlow): predict equal to the environment on {len(client)} photos')
PY

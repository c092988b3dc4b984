#!/usr/bin/env bash
# Host-side checks of scripts/env.sh (it runs outside the environment it makes, so pytest,
# which runs inside, cannot call it). `make test` runs this before pytest.
#  1. A secret passed through the environment (PGPASSWORD) reaches the command inside,
#  2. but never appears on any command line (argv is world-readable in /proc/*/cmdline):
#     a recording `unshare` first in PATH writes every argument it is given.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
real=$(command -v unshare)
cat >"$tmp/unshare" <<SH
#!/bin/bash
printf '%s\n' "\$@" >>"$tmp/argv"
exec "$real" "\$@"
SH
chmod +x "$tmp/unshare"
secret="s3cr3t-$RANDOM-$RANDOM"
fail=0
digest=$(printf %s "$secret" | sha256sum | cut -c1-64)  # the command names the digest only
out=$(PATH="$tmp:$PATH" PGPASSWORD="$secret" "$REPO/scripts/env.sh" run \
      '[ "$(printf %s "$PGPASSWORD" | sha256sum | cut -c1-64)" = '"$digest"' ] && echo SECRET_INSIDE_OK')
if ! grep -q SECRET_INSIDE_OK <<<"$out"; then echo "FAIL: PGPASSWORD did not reach the command"; fail=1; fi
if [ ! -s "$tmp/argv" ] && [ "$("$REPO/scripts/env.sh" path | xargs basename | cut -d- -f1)" = rootfs ]; then
  echo "FAIL: the recording unshare was not used"; fail=1
fi
if grep -qF "$secret" "$tmp/argv" 2>/dev/null; then
  echo "FAIL: PGPASSWORD's value is on unshare's command line"; fail=1
fi
[ $fail = 0 ] || exit 1
echo "[host] env.sh: secret passed by environment only: ok"


# bin/carvision from outside the repository: relative and absolute paths outside it work;
# a system directory of the environment is refused with one line.
work=$(mktemp -d /tmp/carvision-host-XXXX); trap 'rm -rf "$tmp" "$work"' EXIT
photos=("$REPO"/tests/data/car_ads_tiny/images/*.jpg)
cp "${photos[0]}" "$work/photo.jpg"
out=$(cd "$work" && "$REPO/bin/carvision" predict --json --top-k 2 photo.jpg "$work/photo.jpg" 2>"$work/err") || {
  echo "FAIL: bin/carvision predict outside the repository: $(tail -3 "$work/err")"; exit 1; }
[ "$(grep -o '"top_k"' <<<"$out" | wc -l)" = 2 ] || { echo "FAIL: expected 2 answers: $out"; exit 1; }
rc=0; "$REPO/bin/carvision" predict /etc/hostname >/dev/null 2>"$work/err" || rc=$?
[ "$rc" = 2 ] && grep -q 'system directory' "$work/err" || { echo "FAIL: /etc path: rc=$rc $(cat "$work/err")"; exit 1; }
rc=0; "$REPO/bin/carvision" >/dev/null 2>"$work/err" || rc=$?
[ "$rc" = 2 ] && ! grep -q "invalid choice: ''" "$work/err" || { echo "FAIL: no arguments: rc=$rc $(cat "$work/err")"; exit 1; }
echo "[host] bin/carvision: paths outside the repository, no arguments: ok"

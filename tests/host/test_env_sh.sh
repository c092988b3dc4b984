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
photos=("$REPO"/data/car_ads_tiny/images/*.jpg)
cp "${photos[0]}" "$work/photo.jpg"
out=$(cd "$work" && "$REPO/bin/carvision" predict --json --top-k 2 photo.jpg "$work/photo.jpg" 2>"$work/err") || {
  echo "FAIL: bin/carvision predict outside the repository: $(tail -3 "$work/err")"; exit 1; }
[ "$(grep -o '"top_k"' <<<"$out" | wc -l)" = 2 ] || { echo "FAIL: expected 2 answers: $out"; exit 1; }
rc=0; "$REPO/bin/carvision" predict /etc/hostname >/dev/null 2>"$work/err" || rc=$?
[ "$rc" = 2 ] && grep -q 'system directory' "$work/err" || { echo "FAIL: /etc path: rc=$rc $(cat "$work/err")"; exit 1; }
rc=0; "$REPO/bin/carvision" >/dev/null 2>"$work/err" || rc=$?
[ "$rc" = 2 ] && ! grep -q "invalid choice: ''" "$work/err" || { echo "FAIL: no arguments: rc=$rc $(cat "$work/err")"; exit 1; }
echo "[host] bin/carvision: paths outside the repository, no arguments: ok"

# bin/carvision's arguments never reach a command line: a --dsn with a password is refused
# inside (exit 2), and the recording unshare never saw the password; arguments with spaces,
# quotes and non-ASCII letters arrive whole.
rm -f "$tmp/argv"
rc=0; PATH="$tmp:$PATH" "$REPO/bin/carvision" ingest --dsn "host=127.0.0.1 dbname=seez password=$secret" \
  --out "$work/o" >/dev/null 2>"$work/err" || rc=$?
[ "$rc" = 2 ] && grep -q 'contains a password' "$work/err" || { echo "FAIL: --dsn with a password: rc=$rc $(cat "$work/err")"; exit 1; }
if [ ! -s "$tmp/argv" ] && [ "$("$REPO/scripts/env.sh" path | xargs basename | cut -d- -f1)" = rootfs ]; then
  echo "FAIL: the recording unshare was not used by bin/carvision"; exit 1
fi
if grep -qF "$secret" "$tmp/argv" 2>/dev/null; then echo "FAIL: bin/carvision put the --dsn password on a command line"; exit 1; fi
cp "${photos[0]}" "$work/a ph'oto é.jpg"
out=$("$REPO/bin/carvision" predict --json --top-k 1 "$work/a ph'oto é.jpg" 2>"$work/err") || {
  echo "FAIL: a path with a space, a quote and é: $(tail -3 "$work/err")"; exit 1; }
[ "$(python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["input"])' <<<"$out")" = "$work/a ph'oto é.jpg" ] || { echo "FAIL: the path did not arrive whole: $out"; exit 1; }
echo "[host] bin/carvision: arguments off the command line (a --dsn password never on one): ok"

# The model card's code version is git's on the host (the environment has no git; a
# worktree's .git points outside the repository): env.sh hands it in, unless one is set.
want=$(git -C "$REPO" describe --always --dirty 2>/dev/null || true)
if [ -n "$want" ]; then
  got=$("$REPO/scripts/env.sh" run 'python -c "from carvision.pipeline import run; print(run.code_version())"' 2>/dev/null | tail -1)
  [ "$got" = "$want" ] || { echo "FAIL: code_version inside is '$got', git says '$want'"; exit 1; }
  got=$(CARVISION_CODE_VERSION=v9-test "$REPO/scripts/env.sh" run 'python -c "from carvision.pipeline import run; print(run.code_version())"' 2>/dev/null | tail -1)
  [ "$got" = v9-test ] || { echo "FAIL: a set CARVISION_CODE_VERSION was not kept: '$got'"; exit 1; }
  echo "[host] env.sh: the code version reaches the model card: ok"
fi

# A signal to the process that was started stops the command inside, not only env.sh (a
# supervisor's or a preemption's SIGTERM): nothing of it is left running, and the
# exit status says which signal; a command's own status and stdin pass through.
rc=0; "$REPO/scripts/env.sh" run 'exit 7' || rc=$?
[ "$rc" = 7 ] || { echo "FAIL: exit status 7 came back as $rc"; exit 1; }
[ "$(echo piped | "$REPO/scripts/env.sh" run cat)" = piped ] || { echo "FAIL: stdin did not reach the command"; exit 1; }
python3 - "$REPO" <<'PY' || exit 1
import os, signal, subprocess, sys, tempfile, time
for sig, want in ((signal.SIGTERM, 143),):
  marker = f'sleep 3{sig.value}7'  # pgrep: the sleep itself, not the shells that name it
  out_file = tempfile.TemporaryFile()  # not a pipe: an orphan would hold it open
  # default dispositions: a caller started in the background (`cmd &`) ignores SIGINT, and
  # a signal ignored at a shell's start cannot be trapped
  p = subprocess.Popen([f'{sys.argv[1]}/scripts/env.sh', 'run', f'{marker}; echo never'],
                       stdin=subprocess.DEVNULL, stdout=out_file, start_new_session=True,
                       preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL)
                                           for s in (signal.SIGINT, signal.SIGTERM)])
  for _ in range(120):  # until the command runs inside
    if subprocess.run(['pgrep', '-f', '^' + marker], capture_output=True).returncode == 0:
      break
    time.sleep(0.5)
  p.send_signal(sig)
  try:
    rc = p.wait(timeout=30)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    rc = p.wait()
  time.sleep(0.5)
  left = subprocess.run(['pgrep', '-f', '^' + marker], capture_output=True).returncode == 0
  subprocess.run(['pkill', '-f', '^' + marker])
  out_file.seek(0)
  out = out_file.read().decode()
  if rc != want or left or 'never' in out:
    print(f'FAIL: {sig.name}: status {rc} (want {want}), command still running: {left}, output {out!r}')
    sys.exit(1)
PY
echo "[host] env.sh: SIGTERM stops the command inside; status and stdin pass through: ok"

#!/usr/bin/env bash
# carvision's environment: the real tfx 1.21.0 needs glibc >= 2.39 (its
# ml-metadata / TFDV wheels are manylinux_2_39). On such a host we make a plain
# venv; elsewhere (Debian 12) a Debian 13 root filesystem built by debootstrap,
# cached outside the clone and keyed by the lock file's hash, entered through a
# private mount namespace so every mount disappears with the command.
#
#   scripts/env.sh ensure          create the environment if missing (idempotent)
#   scripts/env.sh run CMD...      run CMD (a bash command line) inside it, in the repo
#   scripts/env.sh path            print where the environment lives
#   scripts/env.sh lock            rewrite requirements.lock from the built environment
#
# Environment variables: CARVISION_ENV_CACHE (cache root, default
# ${XDG_CACHE_HOME:-~/.cache}/carvision), CARVISION_ENV_MODE (venv|rootfs, default:
# by glibc), DEBIAN_MIRROR.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$REPO/requirements.lock"
[ -f "$LOCK" ] || LOCK="$REPO/requirements.in"
CACHE=${CARVISION_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/carvision}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the system-package recipe below changes (it is part of the key).
RECIPE="trixie-minbase+python3.13+postgresql+g++ v2"
APT_PKGS="ca-certificates python3 python3-venv python3-dev g++ postgresql libjpeg62-turbo procps"
VENV_IN_ROOT=/opt/venv

glibc_ok() {
  local v; v=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
  [ -n "$v" ] && [ "$(printf '%s\n2.39\n' "$v" | sort -V | head -1)" = "2.39" ]
}

MODE=${CARVISION_ENV_MODE:-}
if [ -z "$MODE" ]; then glibc_ok && MODE=venv || MODE=rootfs; fi
KEY=$( { cat "$LOCK"; echo "$RECIPE $MODE"; } | sha256sum | cut -c1-16)
TARGET="$CACHE/$MODE-$KEY"
MARK="$TARGET/.carvision-complete"

log() { printf '[env] %s\n' "$*" >&2; }

pip_install() {  # $1 = pip executable, $2 = the requirements file (both as seen where it runs)
  echo "$1 install -q -U pip && $1 install -q -r $2 && $1 check"
}

in_root_build() {  # run a command inside the (partial) rootfs, no project mounts needed
  local root=$1; shift
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/bash -ec "$1"
}

build_rootfs() {
  local part="$TARGET.partial"
  command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
  if [ -e "$part" ] && [ ! -x "$part/usr/bin/apt-get" ]; then log "removing half-made $part"; rm -rf --one-file-system "$part"; fi
  mkdir -p "$CACHE"
  if [ ! -x "$part/usr/bin/apt-get" ]; then
    log "debootstrap trixie -> $part"
    rm -rf --one-file-system "$part"
    debootstrap --variant=minbase trixie "$part" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  fi
  mkdir -p "$part/usr/local/share/ca-certificates"
  cp -a /usr/local/share/ca-certificates/. "$part/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp -L /etc/resolv.conf "$part/etc/resolv.conf"
  # Debian's postgresql postinst would create a cluster and try to start it: forbid that.
  mkdir -p "$part/etc/postgresql-common/createcluster.d"
  echo "create_main_cluster = false" >"$part/etc/postgresql-common/createcluster.d/carvision.conf"
  printf '#!/bin/sh\nexit 101\n' >"$part/usr/sbin/policy-rc.d"; chmod +x "$part/usr/sbin/policy-rc.d"
  log "apt: $APT_PKGS"
  in_root_build "$part" "apt-get update -qq && apt-get install -y -qq --no-install-recommends $APT_PKGS >/dev/null && update-ca-certificates >/dev/null && apt-get clean"
  log "venv + pip install ($(basename "$LOCK"))"
  cp "$LOCK" "$part/opt/requirements.txt"
  in_root_build "$part" "[ -x $VENV_IN_ROOT/bin/python ] || python3 -m venv $VENV_IN_ROOT; $(pip_install $VENV_IN_ROOT/bin/pip /opt/requirements.txt)"
  touch "$part/.carvision-complete"
  mv -T "$part" "$TARGET"
}

build_venv() {  # a venv hard-codes its path, so it is built in place; the mark says it is whole
  local py
  py=$(command -v python3.13 || command -v python3.12 || command -v python3.11 || command -v python3)
  mkdir -p "$CACHE"; "$py" -m venv "$TARGET"
  bash -ec "$(pip_install "$TARGET/bin/pip" "$LOCK")"
  touch "$MARK"
}

ensure() {
  [ -f "$MARK" ] && return 0
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock-$KEY"
  flock 9
  [ -f "$MARK" ] && return 0
  if [ -e "$TARGET" ]; then log "removing incomplete $TARGET"; rm -rf --one-file-system "$TARGET"; fi
  local t0=$SECONDS
  log "creating the $MODE environment in $TARGET (once per lock file; a few minutes)"
  if [ "$MODE" = rootfs ]; then
    [ "$(id -u)" = 0 ] || { log "the rootfs environment needs root (debootstrap, chroot); or set CARVISION_ENV_MODE=venv on a glibc>=2.39 host"; exit 1; }
    build_rootfs
  else
    build_venv
  fi
  log "environment ready in $((SECONDS - t0)) s ($(du -sh --one-file-system "$TARGET" | cut -f1))"
}

# Names of the variables passed into the environment (secrets such as PGPASSWORD
# included). Only names travel on command lines: the values are inherited through the
# process environment, so no other local user can read them in /proc/*/cmdline.
pass_names() {
  local v out=()
  for v in $(compgen -e); do
    case "$v" in CARVISION_*|PG*|DATABASE_URL|CI|TERM|COLUMNS|PYTEST_ADDOPTS|GOOGLE_*|CLOUDSDK_*) out+=("$v");; esac
  done
  echo "${out[*]:-}"
}

system_dir() {  # a directory the environment has of its own (mounting over it breaks it)
  case "/${1#/}/" in /bin/*|/boot/*|/dev/*|/etc/*|/lib/*|/lib64/*|/opt/*|/proc/*|/run/*|/sbin/*|/sys/*|/usr/*|/var/*|//) return 0;; esac
  return 1
}

# The command runs as a child of this small shell, which returns its exit status. Without a
# terminal (supervisors, CI, nohup, a preemption notice) the child is a process group of its
# own and SIGTERM, SIGHUP and SIGINT to the process that was started are passed on to that
# whole group: a `kill` stops the command instead of leaving it running orphaned. On a
# terminal the command stays in the terminal's group (Ctrl-C reaches it, it may read the
# keyboard). stdin stays the caller's. `bash -c` execs a simple command in place, so the
# wrapper waits for the command itself (python's clean-up on SIGTERM included).
WRAP='cd "$0" || exit 2
[ -t 0 ] && g="" || { set -m; g=-; }
exec 3<&0
bash -c "$1" 0<&3 3<&- &
c=$!
exec 3<&-
for s in TERM HUP INT; do trap "kill -$s -- $g$c 2>/dev/null" $s; done
[ -n "$g" ] || trap : INT
while kill -0 "$c" 2>/dev/null; do wait "$c"; done
wait "$c"'

run() {
  ensure
  # CARVISION_MOUNTS: host paths (one a line; names only) the command reads or writes
  # outside the repository (bin/carvision lists its arguments' directories and the
  # caller's directory): each is bind-mounted at the same path, so paths mean inside
  # what they mean outside. System directories of the environment are refused.
  # CARVISION_CWD=1: the caller's directory too (skipped when it is a system directory).
  local mounts=() m cwd; cwd=$(pwd)
  while IFS= read -r m; do
    [ -n "$m" ] || continue
    case "$m" in /*) ;; *) log "CARVISION_MOUNTS: $m is not an absolute path"; exit 2;; esac
    m=$(realpath -m "$m")
    case "$m" in "$REPO"|"$REPO"/*) continue;; esac
    if system_dir "$m"; then
      [ "$m" = "$cwd" ] && continue
      log "cannot reach $m from inside the environment (a system directory there): copy it elsewhere, e.g. /tmp"; exit 2
    fi
    [ -d "$m" ] && mounts+=("$m")
  done <<<"${CARVISION_MOUNTS:-}${CARVISION_CWD:+$'\n'$cwd}"
  case "$cwd" in
    "$REPO"|"$REPO"/*) ;;
    *) local inside=""; for m in "${mounts[@]}"; do case "$cwd/" in "$m"/*) inside=1;; esac; done
       [ -n "$inside" ] || cwd=$REPO;;
  esac
  # The code version as git on this side sees it (the environment has no git, and a worktree's
  # .git points outside the repository): the model card's code_version.
  [ -n "${CARVISION_CODE_VERSION:-}" ] || CARVISION_CODE_VERSION=$(git -C "$REPO" describe --always --dirty 2>/dev/null || true)
  export CARVISION_CODE_VERSION
  local common=(TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$REPO" PYTHONDONTWRITEBYTECODE=1 CARVISION_REPO="$REPO")
  if [ "$MODE" = venv ]; then
    exec env "${common[@]}" PATH="$TARGET/bin:$PATH" bash -c "$WRAP" "$cwd" "$*"
  fi
  local shared; shared=$(cd "$REPO/.." && pwd)/shared
  [ -d "$shared" ] || shared=""
  exec unshare --mount --propagation private -- /bin/bash -ec '
    R=$1; P=$2; S=$3; KEEP=" $4 "; MOUNTS=$5; shift 5
    mount -t proc proc "$R/proc"
    mount -t sysfs sysfs "$R/sys"
    mount --rbind /dev "$R/dev"
    # the caller'"'"'s paths first, so the repository and shared/ stay on top of them
    while IFS= read -r m; do [ -n "$m" ] && mkdir -p "$R$m" && mount --bind "$m" "$R$m"; done <<<"$MOUNTS"
    mkdir -p "$R$P" "$R/tmp/carvision"; mount --bind "$P" "$R$P"
    if [ -n "$S" ]; then mkdir -p "$R$S"; mount --bind "$S" "$R$S"; mount -o remount,bind,ro "$R$S" 2>/dev/null || true; fi
    cp -L /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    chmod 1777 "$R/tmp"
    for v in $(compgen -e); do case "$KEEP" in *" $v "*) ;; *) unset "$v" 2>/dev/null || true;; esac; done
    export HOME=/root LANG=C.UTF-8 TMPDIR=/tmp/carvision \
      PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    exec /usr/sbin/chroot "$R" /usr/bin/env "$@"' \
    _ "$TARGET" "$REPO" "$shared" "$(pass_names)" "$(printf '%s\n' "${mounts[@]}")" "${common[@]}" /bin/bash -c "$WRAP" "$cwd" "$*"
}

case "${1:-}" in
  ensure) ensure ;;
  run) shift; run "$@" ;;
  path) echo "$TARGET" ;;
  lock) ensure; (run "pip freeze --exclude-editable | grep -v '^carvision' | sort -f") >"$REPO/requirements.lock.new" && mv "$REPO/requirements.lock.new" "$REPO/requirements.lock"; log "wrote requirements.lock" ;;
  *) echo "usage: $0 ensure|run CMD|path|lock" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Stop softprompt-jax and any other process holding the TPUs on every worker; free the lock.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The bracket keeps the pattern from matching the remote shell that carries it.
STOP_PATTERN="${STOP_PATTERN:-[s]oftprompt[-_]jax}"
GRACE_SECONDS="${GRACE_SECONDS:-10}"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [-h|--help]

On every worker of \$TPU_NAME: SIGTERM the processes matching \$STOP_PATTERN (pkill -f),
wait up to \$GRACE_SECONDS s, then SIGKILL them and every other process that holds a TPU
device (sudo lsof -w /dev/accel* /dev/vfio/*), and remove /tmp/libtpu_lockfile, so the
next run can open the TPUs ("TPU in use", "Unable to initialize backend 'tpu'").

Settings (environment variables, current values):
  STOP_PATTERN=$STOP_PATTERN  GRACE_SECONDS=$GRACE_SECONDS
$COMMON_SETTINGS
USAGE
}

handle_help "$@"
[[ $# -eq 0 ]] || die "unexpected arguments: $* (settings are environment variables; see --help)"
[[ "$GRACE_SECONDS" =~ ^[0-9]+$ ]] || die "GRACE_SECONDS must be a whole number, got '$GRACE_SECONDS'"

pattern="$(quote "$STOP_PATTERN")"
on_all_workers "pkill -TERM -f $pattern || true
for _ in \$(seq $GRACE_SECONDS); do pgrep -f $pattern >/dev/null || break; sleep 1; done
pkill -KILL -f $pattern || true
holders=\$(sudo lsof -t -w /dev/accel* /dev/vfio/* 2>/dev/null | sort -u)
if [ -n \"\$holders\" ]; then sudo kill -9 \$holders || true; fi
sudo rm -f /tmp/libtpu_lockfile
echo \"\$(hostname): TPU free\""

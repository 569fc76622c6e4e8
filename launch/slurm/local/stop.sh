#!/usr/bin/env bash
# Stop the cluster that start.sh started in DIR: only the daemons named by DIR's pid files (slurmd,
# slurmctld, and munged when start.sh was the one that started it). Nothing else is touched.
#
#   launch/slurm/local/stop.sh [DIR]        # DIR as given to start.sh (or $FSCT_SLURM_DIR)
set -euo pipefail

DIR=${1:-${FSCT_SLURM_DIR:-${TMPDIR:-/tmp}/fsct-slurm}}

stop() {
  local pidfile=$1 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$pidfile"
}

[ -d "$DIR" ] || exit 0
# Jobs still on this private cluster are cancelled first so their slurmstepd and tasks do not outlive it.
if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
  export SLURM_CONF=$DIR/slurm.conf
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 30); do
      [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null || true)" ] && break
      sleep 0.5
    done
  fi
fi
# slurmd first, so it does not keep retrying a controller that is gone.
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
stop "$DIR/munged.pid"

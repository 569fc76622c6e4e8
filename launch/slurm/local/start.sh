#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost: a real slurmctld + slurmd, so the batch scripts can be
# tried (and tested) without a cluster. Needs root and the Debian packages `slurm-wlm munge`.
#
#   launch/slurm/local/start.sh [DIR]      # DIR (or $FSCT_SLURM_DIR) holds conf, state, logs, pid files
#   eval "$(launch/slurm/local/start.sh /tmp/fsct-slurm | tail -n 1)"    # exports SLURM_CONF
#   launch/slurm/local/stop.sh /tmp/fsct-slurm
#
# The last line printed is `export SLURM_CONF=DIR/slurm.conf`: every client command (sbatch, squeue,
# scontrol...) needs it. Ports: $FSCT_SLURMCTLD_PORT (6817) and $FSCT_SLURMD_PORT (6818).
# Running it again on a DIR whose cluster is up just prints the export line.
set -euo pipefail

DIR=${1:-${FSCT_SLURM_DIR:-${TMPDIR:-/tmp}/fsct-slurm}}
CTLD_PORT=${FSCT_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${FSCT_SLURMD_PORT:-6818}

die() { echo "start.sh: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "must run as root (slurmd and munged need it)"
for bin in slurmctld slurmd sinfo munged munge unmunge; do
  command -v "$bin" >/dev/null || die "$bin not found (apt-get install -y --no-install-recommends slurm-wlm munge)"
done
mkdir -p "$DIR"/{state,spool,log}
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
  echo "export SLURM_CONF=$CONF"
  exit 0
fi

# munge authenticates every SLURM message. A munged that already answers (system service, another
# cluster) is used as is and left running by stop.sh; one started here is recorded so stop.sh stops it.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile="$key" 2>/dev/null || create-munge-key -f 2>/dev/null \
      || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge "$key" /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge
  chmod 0400 "$key"
  chmod 0755 /run/munge
  if command -v runuser >/dev/null; then
    runuser -u munge -- munged
  else
    su -s /bin/sh munge -c munged
  fi
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$DIR/munged.pid"
fi

# The node's CPUs, sockets and memory exactly as slurmd detects them; a mismatch would drain the node.
hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')

cat >"$CONF" <<EOF
# Written by launch/slurm/local/start.sh: one node on localhost, state under $DIR.
ClusterName=fsct-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again; 10 keeps the
# preemption round trip short here.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (containers rarely allow them): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Jobs that become eligible with no event (a requeued job's begin time passing) wait for the next
# scheduling pass: every 2 s here instead of 60/30.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
EnforcePartLimits=ALL
# Finished jobs leave squeue/scontrol after 4 s; short timeouts keep a laptop session snappy.
MinJobAge=4
KillWait=10
InactiveLimit=0
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
NodeName=localhost $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -i -f "$CONF"
slurmd -N localhost -f "$CONF"

state=""
for _ in $(seq 120); do
  state=$(sinfo -h -N -n localhost -o %t 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
if [ "$state" != idle ]; then
  echo "start.sh: node state is '${state:-unknown}', not idle; last log lines:" >&2
  tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  exit 1
fi
echo "export SLURM_CONF=$CONF"

#!/usr/bin/env bash
# CI leg: real Slurm on this one machine. Installs slurm-wlm and munge when absent (Debian's packages; needs root),
# starts munged, slurmctld and slurmd on localhost with a slurm.conf in a temporary folder, then runs the tests
# marked `slurm` (tests/e2e/test_slurm.py: the examples/slurm scripts, a two-rung tiny scaling study and a two-task
# c10d rendezvous, all through sbatch --wait). The daemons are stopped by their pids on exit, whatever happened.
# Usage: bash .ci/slurm_leg.sh   (from a checkout whose .venv holds the project, as .ci/run's first leg leaves it)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
work=$(mktemp -d /tmp/slurm_leg.XXXXXX)
host=$(hostname -s)
pids=()
stop() {
  # Only the daemons this script started, by the pids they wrote.
  for pid_file in "$work/slurmd.pid" "$work/slurmctld.pid" "$work/munged.pid"; do
    if [[ -s $pid_file ]]; then kill "$(cat "$pid_file")" 2>/dev/null || true; fi
  done
  echo "slurm leg: $(( $(date +%s) - start )) s wall"
}
trap stop EXIT
mkdir -p "$work/state" "$work/spool" "$work/munge"
cat >"$work/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$work/slurm.conf
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
munged --force --pid-file="$work/munged.pid" --socket=/run/munge/munge.socket.2
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qx idle && break
  sleep 1
done
sinfo
echo "slurm leg: cluster up after $(( $(date +%s) - start )) s"
. "${VENV:-.venv}/bin/activate"   # VENV: another environment holding the project
SLURM_LEG=1 python -m pytest -q -m slurm tests/e2e/test_slurm.py

#!/usr/bin/env bash
# Stand up a single-node Slurm 22.05 cluster on localhost (Debian 12, as root, no systemd), for the
# pipeline's Slurm tests and for trying the Slurm profile on one machine. No accounting database: the
# Snakemake profile polls with `slurm-status-command: squeue` (sacct would fail and the plugin would retry
# forever). Idempotent: packages, munged, slurmctld and slurmd are only installed/started when missing.
#   bash workflow/scripts/slurm_up.sh        # stop again with workflow/scripts/slurm_down.sh
set -euo pipefail
T0=$(date +%s)
NODE=$(hostname -s)
NCPU=$(nproc)
# Memory Slurm may hand out; the node must have at least this much.
REAL_MEM_MB=${SLURM_REAL_MEM_MB:-2000}

say() { echo "[slurm_up] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$(id -u)" != 0 ]; then
  echo "[slurm_up] error: must run as root (it installs packages and starts daemons)" >&2
  exit 2
fi

if alive /run/slurmctld.pid && alive /run/slurmd.pid && sinfo -h >/dev/null 2>&1; then
  say "already running: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
  exit 0
fi

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    say "slurm-wlm and munge already installed"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  say "packages installed after $(( $(date +%s) - T0 ))s"
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  # The Debian package normally generates the key; create one if it did not.
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create 2>/dev/null || create-munge-key -f
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
}

write_conf() {
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# keep finished jobs visible to squeue for 5 min (snakemake slurm plugin needs >= 3x its first-poll delay)
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${REAL_MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
  install -d /var/lib/slurm/slurmd
}

start_slurm() {
  alive /run/slurmctld.pid || slurmctld
  alive /run/slurmd.pid || slurmd
  for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -q idle && break; sleep 1; done
  sinfo
}

smoke_test() {
  srun -N1 -n1 hostname
  sbatch --parsable --wait -o /dev/null --wrap 'true' >/dev/null   # --wait: returns when the job ends
}

install_packages
start_munge
write_conf
start_slurm
smoke_test
say "cluster ready after $(( $(date +%s) - T0 ))s"

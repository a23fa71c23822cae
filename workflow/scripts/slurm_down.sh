#!/usr/bin/env bash
# Stop the daemons started by slurm_up.sh, by PID file, and remove the PID files
# (slurmctld runs as user 'slurm' and cannot delete its own /run/slurmctld.pid; a stale one makes the
#  slurmctld package's prerm call scancel and fail on purge). Safe to run when nothing is up.
T0=$(date +%s)

stop() {
  local f=$1 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
  fi
  rm -f "$f"
}

if command -v scancel >/dev/null && [ -s /run/slurmctld.pid ]; then
  timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
fi
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/munge/munged.pid
echo "[slurm_down] stopped after $(( $(date +%s) - T0 ))s"
exit 0

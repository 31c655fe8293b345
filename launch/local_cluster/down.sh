#!/usr/bin/env bash
# launch/local_cluster/down.sh: stop the cluster started by launch/local_cluster/up.sh, by the PIDs in its pid files
# (never by process name), and remove what it wrote. SLURM_LOCAL_KEEP=1 keeps logs and slurm.conf.
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
log() { echo "[slurm-down] $*"; }
# a zombie (dead, not yet reaped by PID 1) counts as stopped
alive() { [ -d /proc/"$1" ] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }
stop_pid() {  # stop_pid PID NAME: SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1 name=$2
  { [ -n "$pid" ] && alive "$pid"; } || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$pid" || { log "stopped $name ($pid)"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true; log "killed $name ($pid) with SIGKILL"
}

# 1. cancel every job while slurmd still runs: slurmstepd and job processes outlive slurmd otherwise
if [ -f "$DIR"/slurmctld.pid ] && alive "$(cat "$DIR"/slurmctld.pid)"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    scancel --full $jobs 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -t R,CG,CF,S 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. slurmd(s), then slurmctld (its slurmscriptd child exits with it), then munged if we started it
for pf in "$DIR"/slurmd-*.pid; do [ -f "$pf" ] && stop_pid "$(cat "$pf")" "$(basename "$pf" .pid)"; done
[ -f "$DIR"/slurmctld.pid ] && stop_pid "$(cat "$DIR"/slurmctld.pid)" slurmctld
if [ -f "$DIR"/munged.pid ]; then
  stop_pid "$(cat "$DIR"/munged.pid)" munged
  rm -f /run/munge/munged.pid
fi
rm -f "$DIR"/*.pid

# 3. files
if [ "${SLURM_LOCAL_KEEP:-0}" != 1 ]; then
  rm -rf "$DIR"
  if [ -f "$CONF" ] && grep -q '^# slurm-local' "$CONF"; then
    rm -f "$CONF"
    if [ -f "$CONF.pre-slurm-local" ]; then mv "$CONF.pre-slurm-local" "$CONF"; fi
  fi
  if grep -q '# slurm-local$' /etc/hosts; then      # rewrite in place: /etc/hosts may be a bind mount
    tmp=$(mktemp); grep -v '# slurm-local$' /etc/hosts > "$tmp"; cat "$tmp" > /etc/hosts; rm -f "$tmp"
  fi
fi
log "down"

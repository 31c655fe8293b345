#!/usr/bin/env bash
# launch/local_cluster/smoke.sh: check a cluster from launch/local_cluster/up.sh: srun tasks, a job array, 2 nodes, requeue on SIGUSR1.
set -euo pipefail
W=$(mktemp -d /tmp/slurm-smoke.XXXX); cd "$W"
wait_job() { for _ in $(seq 300); do squeue -h -j "$1" 2>/dev/null | grep -q . || return 0; sleep 0.2; done; return 1; }
fail() { echo "SMOKE FAIL: $*"; exit 1; }

# (a) 2 tasks via srun
cat > a.sh <<'S'
#!/bin/bash
#SBATCH --ntasks=2 --output=a.out
srun bash -c 'echo "$SLURM_PROCID $SLURM_NTASKS"'
S
j=$(sbatch --parsable a.sh); wait_job "$j"
[ "$(sort a.out | tr '\n' ' ')" = "0 2 1 2 " ] || fail "ntasks: $(cat a.out)"; echo "ok ntasks=2"

# (b) job array 0-2
cat > b.sh <<'S'
#!/bin/bash
#SBATCH --array=0-2 --output=b-%a.out
echo "$SLURM_ARRAY_TASK_ID"
S
j=$(sbatch --parsable b.sh); wait_job "$j"
[ "$(cat b-0.out b-1.out b-2.out | tr '\n' ' ')" = "0 1 2 " ] || fail "array"; echo "ok array"

# (c) 2 nodes, 1 task each: SLURM_NODEID differs
cat > c.sh <<'S'
#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --output=c.out
srun bash -c 'echo "$SLURM_NODEID $SLURMD_NODENAME"'
S
j=$(sbatch --parsable c.sh); wait_job "$j"
[ "$(sort c.out | tr '\n' ' ')" = "0 node1 1 node2 " ] || fail "2 nodes: $(cat c.out)"; echo "ok 2 nodes"

# (d) SIGUSR1 -> scontrol requeue -> second run sees SLURM_RESTART_COUNT=1
cat > d.sh <<'S'
#!/bin/bash
#SBATCH --requeue --open-mode=append --output=d.out
echo "run ${SLURM_RESTART_COUNT:-0}"
[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0
trap 'scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
touch d.ready
sleep 600 & wait
S
t0=$(date +%s); j=$(sbatch --parsable d.sh)
for _ in $(seq 150); do [ -f d.ready ] && break; sleep 0.2; done
scancel --signal=USR1 --batch "$j"; wait_job "$j" || fail "requeue timed out"
# (slurmstepd may also write "*** JOB n CANCELLED ... DUE TO JOB REQUEUE ***" into d.out)
[ "$(grep '^run ' d.out | tr '\n' ' ')" = "run 0 run 1 " ] || fail "requeue: $(cat d.out)"
echo "ok requeue ($(( $(date +%s) - t0 )) s)"
cd /; rm -rf "$W"
echo "4 passed, 0 failed"

#!/usr/bin/env bash
# launch/local_cluster/up.sh: bring up a throwaway SLURM cluster on this one host (Debian 12, as root, no systemd).
# Emulates SLURM_LOCAL_NODES "nodes" node1..nodeN: one slurmd each, all on 127.0.0.1 with their
# own ports (Debian's slurmd is built with MULTIPLE_SLURMD), plus one slurmctld and munged.
# Env knobs:
#   SLURM_LOCAL_DIR     state/spool/logs/pid files     (default /tmp/slurm-local)
#   SLURM_LOCAL_NODES   number of emulated nodes       (default 2)
#   SLURM_LOCAL_CPUS    CPUs advertised per node       (default nproc; may exceed the real cores)
#   SLURM_LOCAL_MEM_MB  RealMemory per node, MB        (default 4000; not enforced)
#   SLURM_LOCAL_AUTH    munge | none                   (default munge; none = no munged, 22.05 only)
#   SLURM_LOCAL_NO_INSTALL=1   fail instead of apt-get installing missing packages
# Exit status: 0 up, 3 a cluster from this script is already running (left alone), anything else failed.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM=${SLURM_LOCAL_MEM_MB:-4000}
AUTH=${SLURM_LOCAL_AUTH:-munge}
CONF=/etc/slurm/slurm.conf
BASEPORT=17001                       # slurmd ports 17001, 17002, ...; slurmctld 6817
log() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }
alive() { [ -d /proc/"$1" ] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$AUTH" in munge|none) ;; *) die "SLURM_LOCAL_AUTH must be munge or none";; esac

# 1. packages: 8 small .debs with --no-install-recommends (5-10 s measured, incl. apt-get update)
need="slurmctld slurmd slurm-client"; [ "$AUTH" = munge ] && need="$need munge"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || { [ "$AUTH" = munge ] && ! command -v munged >/dev/null; }; then
  [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && die "slurm is not installed"
  log "installing $need"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # without systemd (and with a policy-rc.d that says 101) the postinst scripts start nothing: good
  apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# 2. refuse to start on top of a cluster that is still running
for pf in "$DIR"/slurmctld.pid "$DIR"/slurmd-*.pid; do
  [ -f "$pf" ] || continue
  pid=$(cat "$pf" 2>/dev/null || true)
  if [ -n "$pid" ] && alive "$pid"; then
    echo "[slurm-up] ERROR: daemon still running (pid $pid, $pf): run launch/local_cluster/down.sh first" >&2
    exit 3                             # distinct code: a cluster is already up (callers may use it as it is)
  fi
done

# 3. fresh directories (old state is wiped: job ids restart at 1)
rm -rf "$DIR"/state "$DIR"/spool "$DIR"/log "$DIR"/*.pid
mkdir -p "$DIR"/state "$DIR"/spool "$DIR"/log
chmod 755 "$DIR"

# 4. munge: key, runtime dir, daemon (run as the munge user, as systemd would)
if [ "$AUTH" = munge ]; then
  if [ ! -s /etc/munge/munge.key ]; then          # Debian's postinst normally creates it
    log "creating munge key"
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  # munged refuses a key or dirs readable/writable by others
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge         # tmpfs: gone after a reboot, systemd would make it
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running: reusing it (launch/local_cluster/down.sh will leave it alone)"
  else
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start: see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$DIR"/munged.pid          # marks it as ours: launch/local_cluster/down.sh stops it
  fi
  AUTHCONF="AuthType=auth/munge
CredType=cred/munge"
else
  AUTHCONF="AuthType=auth/none
CredType=cred/none"
fi

# 5. node names must resolve: Lightning/torch use the first host of SLURM_NODELIST as MASTER_ADDR
NODELIST="node[1-$NODES]"; [ "$NODES" = 1 ] && NODELIST=node1
missing=""
for i in $(seq 1 "$NODES"); do getent hosts "node$i" >/dev/null || missing="$missing node$i"; done
# append rather than rewrite: /etc/hosts may be a bind mount
[ -n "$missing" ] && echo "127.0.0.1$missing  # slurm-local" >> /etc/hosts

# 6. slurm.conf (in the default place, so sbatch/srun/squeue need no SLURM_CONF)
mkdir -p /etc/slurm
if [ -f "$CONF" ] && ! grep -q '^# slurm-local' "$CONF"; then cp "$CONF" "$CONF.pre-slurm-local"; fi
cat > "$CONF" <<CONFEOF
# slurm-local: generated by launch/local_cluster/up.sh; launch/local_cluster/down.sh removes it
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
$AUTHCONF
# a requeued job waits cred_expire+1 s before it may start again (default 120 s; minimum 5)
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# pgid, not linuxproc: linuxproc loses processes re-parented to init (a "sleep &" left by a batch
# script whose shell exited) and leaves them running; pgid kills the job's whole process group
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# scheduler passes every second (defaults: main loop 60 s, backfill 30 s); a requeued job is only
# started by the next pass after its BeginTime
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# trust the CPUs/memory below rather than the hardware (lets N nodes share 2 cores)
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=DEFAULT CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
CONFEOF
for i in $(seq 1 "$NODES"); do
  echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((BASEPORT + i - 1))" >> "$CONF"
done
echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP" >> "$CONF"

# 7. daemons: without -D they daemonize (stdio to /dev/null) and write their own pid files
/usr/sbin/slurmctld -i
for i in $(seq 1 "$NODES"); do /usr/sbin/slurmd -N "node$i"; done

# 8. wait until every node is idle (about 1 s)
n=0
for _ in $(seq 150); do
  n=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
  [ "$n" -ge "$NODES" ] && break
  sleep 0.2
done
if [ "$n" -lt "$NODES" ]; then
  sinfo -N -l >&2 || true; tail -n 20 "$DIR"/log/*.log >&2 || true
  die "only $n of $NODES nodes idle; logs in $DIR/log"
fi
pids="slurmctld $(cat "$DIR"/slurmctld.pid), slurmd $(cat "$DIR"/slurmd-*.pid | tr '\n' ' ')"
[ "$AUTH" = munge ] && pids="$pids, munged $(cat /run/munge/munged.pid)"
log "up: $NODES node(s) x $CPUS CPUs, auth=$AUTH; pids: $pids"

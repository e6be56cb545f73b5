#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for CI and for trying profiles/slurm on one machine
# (Debian/Ubuntu, root or sudo, no systemd needed).
#   bash .ci/slurm.sh start    install Debian's Slurm if missing, configure, start, wait until idle
#   bash .ci/slurm.sh status   exit 0 and print the node's state when the cluster answers
#   bash .ci/slurm.sh stop     stop the daemons this script started
# A second `start` while the cluster is up does nothing. Knobs (environment):
#   TUNEMAKE_SLURM_DIR  state, logs, pid files, fake devices (default /tmp/tunemake-slurm)
#   FAKE_GPUS           GPUs the node advertises as gres (default 2)
#   SLURM_CPUS          CPUs the node advertises (default: the machine's, at least 8)
#
# Job status without slurmdbd: Snakemake's Slurm plugin asks `sacct` by default, and without an
# accounting database `sacct` knows nothing of finished jobs, so Snakemake would wait forever.
# Running slurmdbd needs MariaDB too (a large install and a slower start), for nothing the tests
# check. Instead MinJobAge keeps finished jobs in `squeue` for 10 minutes and profiles/slurm asks
# `squeue` (which also works on real clusters; the plugin falls back to sacct where MinJobAge is
# short).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "slurm.sh: must run as root (or with sudo)" >&2; exit 1; }
  exec sudo -E bash "$0" "$@"
fi

BASE=${TUNEMAKE_SLURM_DIR:-/tmp/tunemake-slurm}
FAKE_GPUS=${FAKE_GPUS:-2}
RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state ETC=$BASE/etc DEV=$BASE/dev
PARTITION=ci
t0=$(date +%s%N)
say() { printf 'slurm.sh [%5.1f s] %s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$*"; }
die() { echo "slurm.sh: $*" >&2; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # alive PIDFILE

node_state() {  # the node's state as sinfo reports it, or nothing when slurmctld does not answer
  command -v sinfo >/dev/null || return 0
  timeout 5 sinfo -h -N -o %T 2>/dev/null | head -1 || true
}

is_up() {
  alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" || return 1
  case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; esac
  return 1
}

stop_one() {  # stop_one NAME PIDFILE
  local pid
  alive "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$2"
  say "stopped $1 (pid $pid)"
}

stop_all() {
  stop_one slurmd "$RUN/slurmd.pid"
  stop_one slurmctld "$RUN/slurmctld.pid"
  # munged only if this script started it; a munged that was already running is someone else's
  if [ -e "$RUN/munged.ours" ]; then stop_one munged /run/munge/munged.pid; rm -f "$RUN/munged.ours"; fi
}

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge" missing
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  [ -z "$missing" ] && return 0
  say "installing $(echo $missing)"
  # Package scripts must not start services: this script starts and owns the daemons.
  local policy=/usr/sbin/policy-rc.d ours=""
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; ours=1; fi
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || die "apt-get install $(echo $missing) failed"
  if [ -n "$ours" ]; then rm -f "$policy"; fi
  say "installed slurm $(dpkg-query -W -f='${Version}' slurmctld), munge $(dpkg-query -W -f='${Version}' munge)"
}

write_configs() {
  local node=$1 cpus mem gres_node="" gres_types=""
  cpus=${SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
  mem=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # 10 % margin
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d" "$DEV"
  if [ "$FAKE_GPUS" -gt 0 ]; then
    gres_types="GresTypes=gpu" gres_node="Gres=gpu:fake:$FAKE_GPUS"
    # A gres needs a File= that is a character device, else the node is INVAL; /dev/null's numbers.
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
      [ -c "$DEV/fakegpu$i" ] || mknod "$DEV/fakegpu$i" c 1 3
    done
  fi
  # CPUs: rules ask for up to 8 threads (templated_dataset) and the plugin turns threads into
  # --cpus-per-task, which a smaller node refuses; config_overrides lets slurmd advertise them.
  # DefMemPerCPU: without it a job that names no memory takes the whole node and blocks the rest.
  # MinJobAge: finished jobs stay visible to squeue, which is how Snakemake learns they finished.
  cat > "$ETC/slurm.conf" <<EOF
ClusterName=tunemake-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
$gres_types
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  { echo "AutoDetect=off"
    if [ "$FAKE_GPUS" -gt 0 ]; then
      echo "NodeName=$node Name=gpu Type=fake File=$DEV/fakegpu[0-$((FAKE_GPUS - 1))]"
    fi
  } > "$ETC/gres.conf"
  # At the compiled-in path: the plugin's in-job helper drops every SLURM_* variable, SLURM_CONF
  # included, before its nested srun.
  mkdir -p /etc/slurm
  for f in slurm.conf gres.conf; do ln -sfn "$ETC/$f" "/etc/slurm/$f"; done
  say "configured node $node: $cpus CPUs, $mem MB, $FAKE_GPUS fake GPUs, partition $PARTITION"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi   # already running
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$RUN/munged.ours"
  local deadline=$(( SECONDS + 10 ))
  until munge -n 2>/dev/null | unmunge >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "munged does not answer (see /var/log/munge/munged.log)"
    sleep 0.1
  done
  say "munged up"
}

start() {
  if is_up; then say "already up: node $(node_state), nothing to do"; return 0; fi
  install_packages
  stop_all   # whatever is left of an earlier start, half up or stale
  rm -rf "$STATE" "$LOG"   # fresh job ids and node state every start
  local node
  node=$(hostname -s)
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
  write_configs "$node"
  start_munge

  /usr/sbin/slurmctld
  local deadline=$(( SECONDS + 30 ))
  until timeout 5 scontrol ping 2>/dev/null | grep -q UP; do
    # the pid file appears a moment after slurmctld forks; only a stale one means it died
    if [ -s "$RUN/slurmctld.pid" ] && ! alive "$RUN/slurmctld.pid"; then
      tail -5 "$LOG/slurmctld.log" >&2; die "slurmctld exited (see $LOG/slurmctld.log)"
    fi
    [ $SECONDS -lt $deadline ] || die "slurmctld does not answer after 30 s (see $LOG/slurmctld.log)"
    sleep 0.2
  done
  say "slurmctld up (pid $(cat "$RUN/slurmctld.pid"))"

  /usr/sbin/slurmd
  local state=""
  deadline=$(( SECONDS + 60 ))
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    [ "$state" = idle ] && break
    case "$state" in down* | drain* | inval*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;; esac
    sleep 0.2
  done
  [ "$state" = idle ] || { tail -5 "$LOG/slurmd.log" >&2; die "node is '$state' after 60 s, not idle (see $LOG)"; }
  say "slurmd up (pid $(cat "$RUN/slurmd.pid")), node $node idle; Slurm ready"
  sinfo -o '%P %a %l %D %T %N %c %m %G'
}

case "${1:-}" in
  start) start ;;
  stop) stop_all; say "stopped" ;;
  status)
    if is_up; then echo "slurm: up, node $(node_state) ($BASE)"; else echo "slurm: down"; exit 1; fi ;;
  *) echo "usage: bash .ci/slurm.sh start|stop|status" >&2; exit 2 ;;
esac

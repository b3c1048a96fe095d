#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, to run the batch scripts in slurm/ for real (CI and developers).
#
#   slurm/local_cluster.sh install         # Debian's slurmctld, slurmd, slurm-client and munge (needs root and apt)
#   eval "$(slurm/local_cluster.sh start)" # munge, a controller, `slurmd -N node1` and `slurmd -N node2`;
#                                          # prints `export SLURM_CONF=...` for sbatch / squeue / scontrol
#   slurm/local_cluster.sh stop            # stops what start started, removes its files and /etc/hosts entry
#
# STATE_DIR (default /tmp/dpo-scale-slurm) holds the config, spool, logs and pid files, per node where slurm needs
# them apart. Both nodes are this host (NodeAddr=127.0.0.1, ports 17001-17002); node1 and node2 are added to
# /etc/hosts so a master address taken from a job's node list resolves. Runs as root: slurmd must, to start jobs.
set -euo pipefail

STATE_DIR=${STATE_DIR:-/tmp/dpo-scale-slurm}
HOSTS_TAG="# dpo-scale local slurm cluster"
CONTROLLER_PORT=${CONTROLLER_PORT:-16817}

install_packages() {
    local packages=(slurmctld slurmd slurm-client munge)
    if dpkg -s "${packages[@]}" >/dev/null 2>&1; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${packages[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
}

write_config() {
    local host cpus memory
    host=$(hostname)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS, which the tests set
    memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))  # MiB per node: half the machine each
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    cat >"$STATE_DIR/slurm.conf" <<CONF
ClusterName=dposcale
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CONTROLLER_PORT
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldDebug=info
SlurmdDebug=info
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus RealMemory=$memory
PartitionName=local Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # already running (ours from an earlier start, or the machine's)
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE_DIR/started-munge"
}

wait_for_nodes() {
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then
            return
        fi
        sleep 1
    done
    echo "local_cluster.sh: the two nodes did not come up; see $STATE_DIR/*.log" >&2
    sinfo -N >&2 || true
    exit 1
}

start() {
    if [ -e "$STATE_DIR/slurmctld.pid" ] && kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; then
        echo "export SLURM_CONF=$STATE_DIR/slurm.conf"
        return
    fi
    command -v slurmctld >/dev/null || { echo "local_cluster.sh: slurm is not installed; run: $0 install" >&2; exit 1; }
    write_config
    grep -q "$HOSTS_TAG" /etc/hosts || echo "127.0.0.1 node1 node2 $HOSTS_TAG" >>/etc/hosts
    start_munge
    export SLURM_CONF=$STATE_DIR/slurm.conf
    slurmctld -f "$SLURM_CONF" -c  # -c: a clean start, no jobs from an earlier cluster in this directory
    slurmd -f "$SLURM_CONF" -N node1
    slurmd -f "$SLURM_CONF" -N node2
    wait_for_nodes >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    export SLURM_CONF=$STATE_DIR/slurm.conf
    if [ -e "$SLURM_CONF" ]; then
        scancel --quiet --full "$(squeue -h -o %A | paste -sd, -)" 2>/dev/null || true
    fi
    for pidfile in "$STATE_DIR"/slurmd-node*.pid "$STATE_DIR/slurmctld.pid"; do
        [ -e "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    if [ -e "$STATE_DIR/started-munge" ]; then
        pkill -x munged || true
    fi
    sed -i "/$HOSTS_TAG/d" /etc/hosts
    rm -rf "$STATE_DIR"
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install | start | stop   (STATE_DIR=${STATE_DIR})" >&2; exit 2 ;;
esac

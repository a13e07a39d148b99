#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying profiles/slurm.
#
#   tests/slurm/cluster.sh install   Debian packages munge, slurmctld, slurmd, slurm-client (needs root)
#   tests/slurm/cluster.sh start     install if missing, start munged (if none runs), slurmctld and slurmd
#   tests/slurm/cluster.sh status    exit 0 when the controller answers and the node takes jobs
#   tests/slurm/cluster.sh stop      stop what start started, and wait until it is gone
#   tests/slurm/cluster.sh env       print the line that points the SLURM commands at this cluster
#
# The cluster's configuration, state and logs live in one folder, $CTCOHORT_SLURM_DIR (default
# ${TMPDIR:-/tmp}/ctcohort-slurm). While the cluster runs, /etc/slurm/slurm.conf is a link to its
# slurm.conf (start refuses to replace a slurm.conf that is not its own): SLURM_CONF alone would not do,
# because the Snakemake job step on the node runs srun with every SLURM_* variable removed. stop removes
# the link, so that no slurm.conf names a controller that is gone: with one, `scontrol show config`
# waits ~10 s for an answer, and the SLURM executor plugin runs it on every import (Snakemake imports
# every installed executor plugin at each start, local runs included).
#
# No slurmdbd: the cluster has no accounting database, so `sacct` does not work and Snakemake must
# query job states with `--slurm-status-command squeue`; MinJobAge=300 keeps finished jobs (and their
# final state, OUT_OF_MEMORY included) visible to squeue for 5 minutes. A job that uses more memory
# than it asked for is killed by SLURM (jobacct_gather/linux with OverMemoryKill, sampled every second):
# no cgroups needed. Finished jobs are also appended to $CTCOHORT_SLURM_DIR/jobcomp.txt.
set -euo pipefail

DIR=${CTCOHORT_SLURM_DIR:-${TMPDIR:-/tmp}/ctcohort-slurm}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
PACKAGES=(munge slurmctld slurmd slurm-client)
HOST=$(hostname -s)

say() { echo "cluster.sh: $*" >&2; }

alive() {  # a process that exists and is not a zombie
    local pid=$1 state
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [[ $state != Z && $state != X ]]
}

pid_of() { [[ -r $DIR/$1.pid ]] && cat "$DIR/$1.pid" || true; }

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
    done
}

install() {
    installed && return 0
    if [[ $(id -u) != 0 ]]; then
        say "the Debian packages ${PACKAGES[*]} are missing and installing them needs root"
        return 1
    fi
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    say "installed ${PACKAGES[*]} in $((SECONDS - start)) s"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
    runuser -u munge -- /usr/sbin/munged --force
    pgrep -u munge -n -x munged >"$DIR/munged.pid"
    local i
    for i in $(seq 50); do munge_works && return 0; sleep 0.1; done
    say "munged does not answer"
    return 1
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MB, less 1 GB for the system
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh
ClusterName=ctcohort
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups needed
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# memory is a consumable resource; a job step over its --mem is killed (state OUT_OF_MEMORY)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
# no accounting database: squeue answers for finished jobs for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MinJobAge=300
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

node_ready() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

status() {
    [[ -r $CONF ]] || return 1
    alive "$(pid_of slurmctld)" && alive "$(pid_of slurmd)" || return 1
    SLURM_CONF=$CONF timeout 10 scontrol ping >/dev/null 2>&1 && node_ready
}

start() {
    install
    mkdir -p "$DIR"
    if status; then
        say "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    stop_daemons  # leftovers of an unclean stop
    local start=$SECONDS
    start_munge
    write_conf
    rm -rf "$DIR/spool" && mkdir -p "$DIR/spool"  # an empty slurmd spool after an unclean stop
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]] && [[ $(readlink "$SYSTEM_CONF") != "$CONF" ]]; then
        say "$SYSTEM_CONF exists and is not this cluster's: not replacing it"
        return 1
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
    # -c: a clean start, forgetting jobs of an earlier run
    SLURM_CONF=$CONF /usr/sbin/slurmctld -c
    SLURM_CONF=$CONF /usr/sbin/slurmd
    local i
    for i in $(seq 100); do
        if node_ready; then
            say "started in $((SECONDS - start)) s; SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.3
    done
    say "the node did not come up; the logs follow"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    return 1
}

stop_one() {  # SIGTERM, then SIGKILL; done when the process is gone or a zombie
    local name=$1 pid i
    pid=$(pid_of "$name")
    [[ -n $pid ]] || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        fi
    fi
    if alive "$pid"; then
        say "$name (pid $pid) does not stop"
        return 1
    fi
    rm -f "$DIR/$name.pid"
}

stop_daemons() {
    local rc=0
    # jobs still running would outlive slurmd under proctrack/linuxproc: cancel them first
    if [[ -r $CONF ]] && alive "$(pid_of slurmctld)"; then
        SLURM_CONF=$CONF timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
    fi
    stop_one slurmd || rc=1
    stop_one slurmctld || rc=1
    stop_one munged || rc=1  # only a munged that start started has a pid file here
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
    return $rc
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac

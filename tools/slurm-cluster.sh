#!/usr/bin/env bash
# A Slurm cluster on this one machine, for tests: munged, slurmctld and one or two slurmd (fake
# nodes n1, n2), with everything they write (config, munge key and socket, state, spool, logs, PID
# files) under one directory DIR.
#
#   tools/slurm-cluster.sh start DIR [NODES]  start it with NODES nodes (1 or 2, default 2) and
#                                             wait until every node is idle
#   tools/slurm-cluster.sh env DIR            print the `export SLURM_CONF=...` line that points
#                                             sbatch, srun, sinfo, scontrol ... at it
#   tools/slurm-cluster.sh stop DIR           cancel its jobs, then stop the daemons that start
#                                             started (from their PID files) and wait until they exit
#
# start needs root: the daemons run as root (SlurmUser=root), and it installs the Debian packages
# slurm-wlm and munge with apt-get when slurmctld, slurmd or munged is missing. Without root, or
# without the packages and apt-get, it exits with status 3 and says why; any other failure exits
# with status 1 (a start that fails prints the tails of the daemons' logs and stops what it
# started). Each node has NodeAddr=127.0.0.1, a port of its own and CPUs=2 (the nodes share this
# machine's CPUs), and no cgroup, affinity or accounting plugin. No system-wide configuration is
# read or changed (/etc/slurm, /etc/munge, systemd units): only installing the packages touches the
# system, and a cluster in another DIR, running or stopped, is left alone.
#
# From a shell:
#   tools/slurm-cluster.sh start /tmp/slurm && eval "$(tools/slurm-cluster.sh env /tmp/slurm)"
#   sinfo; sbatch --wait --nodes 2 launch/slurm/train.sbatch train_iters=10
#   tools/slurm-cluster.sh stop /tmp/slurm
set -euo pipefail

PACKAGES="slurm-wlm munge"
IDLE_TIMEOUT_S=60  # start: the nodes are idle in a few seconds; a slow CI machine gets margin
EXIT_TIMEOUT_S=15  # stop: how long a daemon, or a cancelled job, may take to go after SIGTERM
UNABLE=3           # start's exit status where no cluster can run: not root, or no packages nor apt-get
# The first line of the slurm.conf that start writes: how it knows a DIR of its own.
HEADER="# Written by tools/slurm-cluster.sh"
# The daemons live in sbin, which not every PATH holds.
PATH=$PATH:/usr/sbin:/sbin

die() {
    echo "tools/slurm-cluster.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# unable REASON: exit with status 3, the packages or the rights this machine lacks for a cluster.
unable() {
    echo "tools/slurm-cluster.sh: cannot start a cluster here: $*" >&2
    exit "$UNABLE"
}

# install_packages: apt-get install the packages when a daemon or client is missing.
install_packages() {
    local tool missing=()
    for tool in munged munge unmunge slurmctld slurmd sinfo squeue scancel; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null 2>&1 ||
        unable "${missing[*]} not found and apt-get is not on PATH to install them: install the packages $PACKAGES"
    echo "tools/slurm-cluster.sh: ${missing[*]} not found: installing $PACKAGES with apt-get" >&2
    # shellcheck disable=SC2086  # PACKAGES is a list of words
    {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES
    } >&2 || die "'apt-get install $PACKAGES' failed (its output is above)"
}

# port_taken PORT: some TCP socket of this machine has local port PORT.
port_taken() {
    local hex
    printf -v hex '%04X' "$1"
    awk -v port=":$hex" '$2 ~ port "$" { found = 1 } END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# free_ports COUNT: the first of COUNT consecutive TCP ports that no socket uses.
free_ports() {
    local count=$1 base offset attempt
    for attempt in $(seq 50); do
        base=$((20000 + RANDOM % 30000))
        for ((offset = 0; offset < count; offset++)); do
            port_taken $((base + offset)) && continue 2
        done
        echo "$base"
        return 0
    done
    die "found no $count consecutive free TCP ports in 20000-50000 after $attempt tries"
}

# alive PID: that process exists and has not exited (a zombie, not yet reaped, has exited).
alive() {
    local stat
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != [ZX] ]]
}

dead() {
    ! alive "$1"
}

# pid_of NAME: the PID in DIR/run/NAME.pid when that process is alive and one of this cluster's
# (its command line names DIR: a PID reused by another process is not ours); else nothing.
pid_of() {
    local file=$RUN/$1.pid pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 0
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$DIR/"* ]] || return 0
    echo "$pid"
}

running() {
    [[ -n $(pid_of "$1") ]]
}

# daemon_names: the names of this cluster's PID files, slurmd first, munged last (stop's order).
daemon_names() {
    local file name
    for file in "$RUN"/slurmd-*.pid; do
        [[ -e $file ]] || continue
        name=${file##*/}
        echo "${name%.pid}"
    done
    echo slurmctld
    echo munged
}

log_tails() {
    local file
    for file in "$LOGS"/*; do
        [[ -s $file ]] || continue
        echo "--- last lines of $file:"
        tail -n 25 "$file"
    done
}

fail_start() {
    {
        echo "tools/slurm-cluster.sh: $*"
        log_tails
    } >&2
    stop_daemons >&2
    exit 1
}

# wait_until SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; false on timeout.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

munge_works() {
    munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1
}

# nodes_idle: sinfo lists every node, each idle; fails early when a daemon is gone.
nodes_idle() {
    local name states
    for name in slurmctld "${NODE_NAMES[@]/#/slurmd-}"; do
        running "$name" || fail_start "$name exited during start"
    done
    states=$(sinfo --noheader --Node --format='%N %T' 2>/dev/null) || return 1
    [[ $states == "$EXPECTED_STATES" ]]
}

write_config() {
    local ctld_port=$1 node
    cat >"$CONF" <<EOF
$HEADER
# A test cluster of ${#NODE_NAMES[@]} fake node(s) on this machine.
ClusterName=mhc-test
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# An empty file: no SPANK plugin of /etc/slurm is loaded.
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Schedule a batch job when it is submitted, not up to 3 s later.
SchedulerParameters=batch_sched_delay=0
# The nodes are what this file says, whatever this machine's CPU count.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=2
# sbatch --wait polls every 2 s while MinJobAge is below 6 s (it polls less often the longer it
# may); a finished job's record stays at least this long, enough for sbatch --wait to see it end.
MinJobAge=4
MailProg=/bin/true
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    for node in "${!NODE_NAMES[@]}"; do
        echo "NodeName=${NODE_NAMES[node]} NodeAddr=127.0.0.1 Port=$((ctld_port + 1 + node))" \
            "CPUs=2 State=UNKNOWN" >>"$CONF"
    done
}

start_cluster() {
    local nodes=$1 name node
    # unix socket paths hold at most 107 bytes; slurmstepd's sockets live under the spool
    ((${#SOCKET} <= 100)) || die "DIR='$DIR' is too long for a unix socket path under it: use a shorter one"
    ((EUID == 0)) ||
        unable "this user is not root: the daemons run as root (SlurmUser=root), and start may install packages"
    install_packages
    for name in $(daemon_names); do
        ! running "$name" || die "a cluster already runs in $DIR ($name): stop it first"
    done

    NODE_NAMES=()
    EXPECTED_STATES=""
    for ((node = 1; node <= nodes; node++)); do
        NODE_NAMES+=("n$node")
        EXPECTED_STATES+="${EXPECTED_STATES:+$'\n'}n$node idle"
    done
    # what follows empties DIR's folders: only those of an earlier cluster of this script
    [[ -z $(ls -A "$DIR") || $(head -n 1 "$CONF" 2>/dev/null) == "$HEADER" ]] ||
        die "DIR='$DIR' holds files but no cluster of this script: give a new or empty directory"
    rm -rf "$RUN" "$LOGS" "$DIR/state" "$DIR/spool" "$DIR/munge"
    mkdir -p "$RUN" "$LOGS" "$DIR/state" "${NODE_NAMES[@]/#/$DIR/spool/}"
    # munged wants the directory of its socket world-executable, and its key private
    mkdir -m 0755 "$DIR/munge"
    (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    : >"$DIR/plugstack.conf"
    write_config "$(free_ports $((nodes + 1)))"

    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$RUN/munged.pid" \
        --seed-file="$DIR/munge/munged.seed" --log-file="$LOGS/munged.log" </dev/null >>"$LOGS/munged.out" 2>&1 ||
        fail_start "munged did not start"
    wait_until 10 munge_works || fail_start "munged does not answer on $SOCKET"
    # -c: no state of an earlier cluster in DIR (jobs, node states) comes back
    slurmctld -c -f "$CONF" </dev/null >>"$LOGS/slurmctld.out" 2>&1 || fail_start "slurmctld did not start"
    for name in "${NODE_NAMES[@]}"; do
        slurmd -N "$name" -f "$CONF" </dev/null >>"$LOGS/slurmd-$name.out" 2>&1 ||
            fail_start "slurmd -N $name did not start"
    done
    # each daemon writes its PID file after it has forked into the background
    for name in munged slurmctld "${NODE_NAMES[@]/#/slurmd-}"; do
        wait_until 10 running "$name" || fail_start "$name is not running: no live process in $RUN/$name.pid"
    done
    wait_until "$IDLE_TIMEOUT_S" nodes_idle ||
        fail_start "the nodes are not all idle after ${IDLE_TIMEOUT_S} s; sinfo says:" \
            "$(sinfo --noheader --Node --format='%N %T %E' 2>&1 || true)"
    echo "slurm cluster of $nodes node(s) up in $DIR; use it with:" \
        "eval \"\$(tools/slurm-cluster.sh env $(printf %q "$DIR"))\""
}

no_jobs() {
    [[ -z $(squeue --noheader --format=%i 2>/dev/null) ]]
}

# cancel_jobs: cancel every job, so that no slurmstepd or job process outlives the daemons.
cancel_jobs() {
    local jobs
    running slurmctld || return 0
    jobs=$(squeue --noheader --format=%i 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086  # one job id a word
    scancel $jobs 2>/dev/null || true
    wait_until "$EXIT_TIMEOUT_S" no_jobs ||
        echo "tools/slurm-cluster.sh: warning: jobs $jobs still listed after scancel" >&2
}

# stop_daemons: SIGTERM each live daemon of the PID files, wait until it exits (a daemon removes
# its PID file first), SIGKILL it if it does not.
stop_daemons() {
    local name pid
    for name in $(daemon_names); do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            if ! wait_until "$EXIT_TIMEOUT_S" dead "$pid"; then
                echo "tools/slurm-cluster.sh: warning: $name (pid $pid) did not exit" \
                    "${EXIT_TIMEOUT_S} s after SIGTERM: killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                wait_until 5 dead "$pid" || die "$name (pid $pid) survives SIGKILL"
            fi
        fi
        rm -f "$RUN/$name.pid"
    done
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi
(($# >= 2)) || die "expected a command and a directory, e.g. 'start /tmp/slurm' (see --help)"
COMMAND=$1
[[ -n $2 ]] || die "DIR is empty: expected the cluster's directory"
case $COMMAND in
start)
    (($# <= 3)) || die "start takes DIR and NODES, got $(($# - 1)) arguments"
    NODES=${3:-2}
    [[ $NODES == 1 || $NODES == 2 ]] || die "NODES='$NODES' is not valid: expected 1 or 2"
    ;;
env | stop) (($# == 2)) || die "$COMMAND takes DIR only, got $(($# - 1)) arguments" ;;
*) die "unknown command '$COMMAND': expected start, env or stop" ;;
esac
[[ $COMMAND == start ]] && mkdir -p "$2"
[[ -d $2 ]] || die "DIR='$2' is not a directory"
DIR=$(cd "$2" && pwd -P)
CONF=$DIR/slurm.conf
RUN=$DIR/run
LOGS=$DIR/log
SOCKET=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

case $COMMAND in
start) start_cluster "$NODES" ;;
env)
    [[ -f $CONF ]] || die "$DIR holds no slurm.conf: start a cluster there first"
    echo "export SLURM_CONF=$(printf %q "$CONF")"
    ;;
stop)
    cancel_jobs
    stop_daemons
    ;;
esac

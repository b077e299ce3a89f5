#!/usr/bin/env bash
# Start the mhc-train job on this node: one node alone, or one node of a multi-node run.
#
#   launch/torchrun.sh [key=value ...]
#
# Each argument is handed to `python -m mhc_megatron.train` as a key=value override of the
# config, in the order given. Every other setting is an environment variable:
#
#   NNODES          number of nodes in the run                         default 1
#   NODE_RANK       this node's rank, 0 .. NNODES-1                    default 0
#   MASTER_ADDR     host name or address of the rank-0 node            default localhost
#   MASTER_PORT     free TCP port on the rank-0 node                   default 29500
#   NPROC_PER_NODE  processes (GPUs) on this node                      default: the number of
#                   entries in CUDA_VISIBLE_DEVICES when it is set (1 when empty), else the
#                   GPUs that `nvidia-smi -L` lists, else 1 (a CPU run)
#   CONFIG          YAML config; a relative path is kept when found from the current
#                   directory, else taken from the repository root     default configs/tiny-cpu.yaml
#   PYTHON          interpreter that has torch and mhc_megatron        default .venv/bin/python of
#                   the repository when it exists, else python3
#   DRY_RUN         1: print the command and exit without running it   default 0
#
# The command is printed on one line, prefixed with "+ ", before it is run. The script exits with
# mhc-train's own exit status (torchrun's is 1 on any failure): 0 done, 2 bad input, 3 diverged,
# 75 stopped by its exit signal or time budget after saving (resume with load=); SIGTERM sent to
# the script reaches torchrun, which passes it on to its workers (launch/lib/run-job.sh).
#
# One node, all of its GPUs:
#   launch/torchrun.sh train_iters=100 hc_mode=residual
#
# Two nodes: run the same command on each, with that node's NODE_RANK:
#   node A (10.0.0.1):  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 CONFIG=configs/X.yaml launch/torchrun.sh
#   node B:             NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 CONFIG=configs/X.yaml launch/torchrun.sh
#
# See the command without running it:
#   DRY_RUN=1 launch/torchrun.sh train_iters=100
set -euo pipefail

die() {
    echo "launch/torchrun.sh: $*" >&2
    exit 1
}

# require_int NAME VALUE MIN [MAX]: VALUE must be a decimal integer in [MIN, MAX].
require_int() {
    local name=$1 value=$2 min=$3 max=${4:-}
    local expected="an integer >= $min"
    [[ -n $max ]] && expected="an integer from $min to $max"
    if ! [[ $value =~ ^[0-9]+$ ]] || ((10#$value < min)) || { [[ -n $max ]] && ((10#$value > max)); }; then
        die "$name='$value' is not valid: expected $expected"
    fi
}

# Number of GPUs this node should use when NPROC_PER_NODE is not given.
count_gpus() {
    local count=0 entry
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local -a entries
        IFS=, read -ra entries <<<"$CUDA_VISIBLE_DEVICES"
        for entry in ${entries[@]+"${entries[@]}"}; do  # (an empty array trips set -u in bash < 4.4)
            if [[ -n ${entry// /} ]]; then count=$((count + 1)); fi
        done
    elif command -v nvidia-smi >/dev/null 2>&1; then
        count=$({ nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU [0-9]' || true)
    fi
    if ((count > 0)); then echo "$count"; else echo 1; fi
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(count_gpus)}
CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
DRY_RUN=${DRY_RUN:-0}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO_ROOT/.venv/bin/python ]]; then PYTHON=$REPO_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

require_int NNODES "$NNODES" 1
require_int NODE_RANK "$NODE_RANK" 0 $((10#$NNODES - 1))
require_int MASTER_PORT "$MASTER_PORT" 1 65535
require_int NPROC_PER_NODE "$NPROC_PER_NODE" 1
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN='$DRY_RUN' is not valid: expected 0 or 1"
[[ -n $MASTER_ADDR && $MASTER_ADDR != *[[:space:]]* ]] ||
    die "MASTER_ADDR='$MASTER_ADDR' is not valid: expected a host name or address"

if [[ $CONFIG != /* && ! -f $CONFIG ]]; then
    if [[ ! -f $REPO_ROOT/$CONFIG ]]; then
        looked="$PWD/$CONFIG"
        [[ $PWD -ef $REPO_ROOT ]] || looked+=" nor $REPO_ROOT/$CONFIG"
        die "CONFIG='$CONFIG' not found: no file $looked"
    fi
    CONFIG=$REPO_ROOT/$CONFIG
elif [[ ! -f $CONFIG ]]; then
    die "CONFIG='$CONFIG' not found: expected a YAML config file"
fi

for arg in "$@"; do
    [[ $arg == [!=]*=* ]] || die "argument '$arg' is not valid: expected key=value (e.g. train_iters=100)"
done

cmd=(
    "$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    --nproc-per-node "$NPROC_PER_NODE"
    -m mhc_megatron.train --config "$CONFIG" "$@"
)
printf -v line '%q ' "${cmd[@]}"
echo "+ ${line% }"

[[ $DRY_RUN == 1 ]] && exit 0
if [[ $PYTHON == */* ]]; then
    [[ -x $PYTHON ]] || die "PYTHON='$PYTHON' is not an executable file (run 'make setup' to create .venv)"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON='$PYTHON' is not found on PATH"
fi
# shellcheck source=launch/lib/run-job.sh
source "$REPO_ROOT/launch/lib/run-job.sh"
status_file=$(mktemp "${TMPDIR:-/tmp}/mhc-train-exit.XXXXXX")
status=0
run_job "$status_file" "${cmd[@]}" || status=$?
rm -f "$status_file"
exit "$status"

# shellcheck shell=bash
# Sourced by launch/torchrun.sh and launch/slurm/train.sbatch: run the job's command to its end and
# return mhc-train's own exit status.
#
# torchrun exits with 1 whenever a worker fails, whatever the worker's status; every rank of
# mhc-train writes its status to $MHC_EXIT_STATUS_FILE (mhc_megatron/training/cli.py), and run_job
# returns that one when it was written: 0 done, 2 bad input, 3 diverged, 75 interrupted by the exit
# signal or the time budget after saving (resume with load=). A job that died before writing it
# returns the command's own status.

# run_job STATUS_FILE COMMAND...: run COMMAND in the background and wait for it, passing SIGTERM and
# SIGHUP sent to this shell on to it (a shell that died of them would leave COMMAND running
# unwatched, and under Slurm the job would end with it, killing a checkpoint save halfway).
run_job() {
    local status_file=$1 child status=0
    shift
    rm -f "$status_file"
    export MHC_EXIT_STATUS_FILE=$status_file
    "$@" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM
    trap 'kill -HUP "$child" 2>/dev/null || true' HUP
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do  # a trapped signal ended the wait, not the command
        status=0
        wait "$child" || status=$?
    done
    trap - TERM HUP
    if [[ -s $status_file ]]; then
        status=$(<"$status_file")
        rm -f "$status_file"
    fi
    return "$status"
}

"""``sbatch launch/slurm/train.sbatch`` on the cluster of tools/slurm-cluster.sh: 2 fake nodes on
this machine, one task and one training process on each, meeting through torchrun's c10d rendezvous
at the first node's NodeAddr (127.0.0.1; the node names n1, n2 do not resolve)."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhc_megatron.world import free_port

from .conftest import QUIET, ROOT, Job, assert_matches_one_process, read_metrics, run_train

SCRIPT = "launch/slurm/train.sbatch"


def sbatch(slurm_env: dict[str, str], job: Job, workdir: Path, *overrides: str, port: int,
           options: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    """``sbatch --wait`` of the script on 2 nodes x 1 task with ``job``'s config, rendezvous on
    ``port``, started; submitted from the repository root, as the script asks, to work in
    ``workdir`` (where its output file goes)."""
    env = {**slurm_env, **QUIET, "CONFIG": str(job.config), "PYTHON": sys.executable, "MASTER_PORT": str(port), **env}
    command = ["sbatch", "--wait", "--parsable", f"--chdir={workdir}", "--nodes=2", "--ntasks-per-node=1", *options,
               SCRIPT, *overrides]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submitted_job_id(submission: subprocess.Popen) -> str:
    """The id ``sbatch --parsable`` prints as soon as the job is queued."""
    line = submission.stdout.readline()
    job_id = line.split(";")[0].strip()
    assert job_id.isdigit(), f"sbatch printed no job id: {line!r} {submission.stderr.read() if not line else ''}"
    return job_id


def submit(slurm_env: dict[str, str], job: Job, workdir: Path, *overrides: str,
           port: int) -> tuple[subprocess.CompletedProcess, str]:
    """``sbatch`` as above, waited for: its result and the job id."""
    submission = sbatch(slurm_env, job, workdir, *overrides, port=port)
    job_id = submitted_job_id(submission)
    stdout, stderr = submission.communicate(timeout=300)
    return subprocess.CompletedProcess(submission.args, submission.returncode, stdout, stderr), job_id


def output_file(workdir: Path, job_id: str) -> Path:
    """Where the script's ``#SBATCH --output`` puts the job's output: relative to its working directory."""
    pattern = re.search(r"^#SBATCH --output=(\S+)$", (ROOT / SCRIPT).read_text(), re.MULTILINE)
    assert pattern, f"{SCRIPT} has no #SBATCH --output line"
    return workdir / pattern[1].replace("%j", job_id)


def job_record(slurm_env: dict[str, str], job_id: str) -> dict[str, str]:
    """Fields of ``scontrol show job`` (kept MinJobAge = 4 s after the job ends: ask at once)."""
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], env=slurm_env, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(?:^|\s)(JobState|ExitCode|NodeList)=(\S+)", shown.stdout))


def test_two_node_job_matches_one_process(slurm_env, job, one_process, tmp_path):
    port = free_port()
    result, job_id = submit(slurm_env, job, tmp_path, *job.arguments(tmp_path / "run"), port=port)
    record = job_record(slurm_env, job_id)
    output = output_file(tmp_path, job_id)
    assert output.is_file(), f"no {output} (sbatch: {result.stderr}); {tmp_path} holds {sorted(tmp_path.iterdir())}"
    log = output.read_text()
    assert result.returncode == 0, f"sbatch: {result.stderr}\njob output:\n{log[-6000:]}"
    assert record == {"JobState": "COMPLETED", "ExitCode": "0:0", "NodeList": "n[1-2]"}
    assert "--nnodes 2 --nproc-per-node 1" in log and f"--rdzv-endpoint 127.0.0.1:{port}" in log, log
    assert "world 2 =" in log, log
    assert_matches_one_process(read_metrics(tmp_path / "run"), one_process)


def test_sbatch_wait_returns_the_exit_status_of_a_failed_job(slurm_env, job, tmp_path):
    result, job_id = submit(slurm_env, job, tmp_path, *job.arguments(tmp_path / "run"), "hiden_size=64",
                            port=free_port())
    record = job_record(slurm_env, job_id)
    # mhc-train's status for bad input, not torchrun's 1: the script reads it from the status file
    assert result.returncode == 2, result
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", (record, result)
    assert "unknown config key 'hiden_size'" in output_file(tmp_path, job_id).read_text()


def wait_until_completed(slurm_env: dict[str, str], job_id: str, deadline: float, log: Path) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job has COMPLETED (its record lasts MinJobAge = 4 s after);
    a requeued job that is PENDING is started after a few seconds (Slurm holds it for about two
    minutes, its begin time). FAILED, TIMEOUT or NODE_FAIL fails, with the record and the job's ``log`` (not
    CANCELLED: the first run of a requeued job ends so, "due to job requeue")."""
    started = False
    while (record := job_record(slurm_env, job_id)).get("JobState") != "COMPLETED":
        failed = record.get("JobState") in ("FAILED", "TIMEOUT", "NODE_FAIL")
        assert not failed and time.monotonic() < deadline, f"job {job_id}: {record}\n{log.read_text()[-6000:]}"
        if record.get("JobState") == "PENDING" and not started:
            # not in the second of the requeue: slurmd refuses a credential made in the second its job's
            # old one was revoked ("Killing non-startable batch job: Job credential revoked")
            time.sleep(2.5)
            update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
            assert subprocess.run(update, env=slurm_env, capture_output=True, timeout=30).returncode == 0
            started = True
        time.sleep(0.1)
    return record


def test_a_signalled_job_saves_requeues_itself_and_resumes(slurm_env, job, tmp_path):
    """``scancel --signal=TERM`` once the model is built: every rank finishes its step, the run saves
    and exits with 75; with REQUEUE=1 the script requeues the job, which resumes from the checkpoint
    (save = load) and completes with the losses of the uninterrupted run. (``sbatch --wait`` returns
    when the first run ends, requeued; the job is followed with scontrol after that.) Longer
    sequences and more steps than ``job``'s, so that the signal lands before the last step."""
    longer = ("train_iters=10", "seq_length=256")
    run_train("--config", str(job.config), *job.arguments(tmp_path / "one-process"), *longer)
    save = tmp_path / "checkpoints"
    submission = sbatch(slurm_env, job, tmp_path, *job.arguments(tmp_path / "run"), *longer, f"save={save}",
                        f"load={save}", port=free_port(), options=("--requeue",), REQUEUE="1")
    job_id = submitted_job_id(submission)
    output = output_file(tmp_path, job_id)
    deadline = time.monotonic() + 180
    while not (output.is_file() and "model: " in output.read_text()):
        assert submission.poll() is None and time.monotonic() < deadline, output.read_text() if output.is_file() else ""
        time.sleep(0.1)
    scancel = ["scancel", "--signal=TERM", job_id]
    assert subprocess.run(scancel, env=slurm_env, capture_output=True, timeout=30).returncode == 0
    record = wait_until_completed(slurm_env, job_id, deadline, output)
    submission.communicate(timeout=60)
    log = output.read_text()
    assert record["ExitCode"] == "0:0", log[-6000:]
    stopped = re.search(r"stopping after step (\d+): SIGTERM received", log)
    assert stopped and int(stopped[1]) < 10, log[-6000:]
    assert f"requeueing job {job_id}" in log and f"resuming after step {stopped[1]}" in log, log[-6000:]
    latest = {r["step"]: r for r in read_metrics(tmp_path / "run")}  # step records after the stop, once
    reference = read_metrics(tmp_path / "one-process")
    assert sorted(latest) == [r["step"] for r in reference] == list(range(1, 11))
    for one in reference:
        assert latest[one["step"]]["loss"] == pytest.approx(one["loss"], rel=1e-5), (one, latest[one["step"]])

"""``sbatch launch/slurm/train.sbatch`` on the cluster of tools/slurm-cluster.sh: 2 fake nodes on
this machine, one task and one training process on each, meeting through torchrun's c10d rendezvous
at the first node's NodeAddr (127.0.0.1; the node names n1, n2 do not resolve)."""

import re
import subprocess
import sys
from pathlib import Path

from .conftest import QUIET, ROOT, Job, assert_matches_one_process, free_port, read_metrics

SCRIPT = "launch/slurm/train.sbatch"


def submit(slurm_env: dict[str, str], job: Job, workdir: Path, *overrides: str,
           port: int) -> tuple[subprocess.CompletedProcess, str]:
    """``sbatch --wait`` of the script on 2 nodes x 1 task with ``job``'s config, rendezvous on
    ``port``; submitted from the repository root, as the script asks, to work in ``workdir`` (where
    its output file goes). The result and the job id."""
    env = {**slurm_env, **QUIET, "CONFIG": str(job.config), "PYTHON": sys.executable, "MASTER_PORT": str(port)}
    command = ["sbatch", "--wait", "--parsable", f"--chdir={workdir}", "--nodes=2", "--ntasks-per-node=1", SCRIPT,
               *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    job_id = result.stdout.split(";")[0].strip()
    assert job_id.isdigit(), f"sbatch printed no job id:\n{result.stdout}{result.stderr}"
    return result, job_id


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
    assert result.returncode != 0
    # the job's exit status: the srun step's, 1 or 143 as the failing rank or --kill-on-bad-exit ends each task
    assert record["JobState"] == "FAILED" and record["ExitCode"] == f"{result.returncode}:0", (record, result)
    assert "unknown config key 'hiden_size'" in output_file(tmp_path, job_id).read_text()

"""Two ``launch/torchrun.sh`` agents started as on two nodes (NNODES=2, NODE_RANK 0 and 1, one
MASTER_ADDR), without Slurm: they train the job of the one-process run, with its losses."""

import os
import subprocess
import sys
import time

from mhc_megatron.world import free_port

from .conftest import QUIET, ROOT, assert_matches_one_process, read_metrics


def wait_for_all(agents: list[subprocess.Popen], timeout: float) -> list[int]:
    """The exit statuses of ``agents`` once all have exited. When one fails or the time is up, the
    others are stopped at once rather than left waiting for a rendezvous that will not come: SIGTERM,
    on which torchrun stops its workers (each in a session of its own), then SIGKILL."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [agent.poll() for agent in agents]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        running = [agent for agent in agents if agent.poll() is None]
        for agent in running:
            agent.terminate()
        for agent in running:
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    return [agent.returncode for agent in agents]


def test_two_agents_match_one_process(job, one_process, tmp_path):
    env = {**os.environ, **QUIET, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "NPROC_PER_NODE": "1", "CONFIG": str(job.config), "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "launch/torchrun.sh"), *job.arguments(tmp_path / "run")]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    agents = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            agents.append(subprocess.Popen(command, cwd=tmp_path, env={**env, "NODE_RANK": str(rank)}, stdout=out,
                                           stderr=subprocess.STDOUT))
    codes = wait_for_all(agents, timeout=300)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- NODE_RANK {rank} (exit status {code}):\n{out[-4000:]}"
                                       for rank, (code, out) in enumerate(zip(codes, outputs)))
    # the last rank logs: the worker of NODE_RANK 1, as the static rendezvous ranks the nodes
    assert "world 2 =" in outputs[1] and "world 2 =" not in outputs[0], outputs
    assert_matches_one_process(read_metrics(tmp_path / "run"), one_process)

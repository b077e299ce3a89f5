"""launch/torchrun.sh and launch/slurm/train.sbatch: the exact command each one builds and runs.

Each test runs a copy of the scripts inside a made-up repository under tmp_path, with a PATH of a
few symlinked tools plus fakes (nvidia-smi, scontrol, srun, python) where a test needs them, so
no GPU, slurm or network is needed and the real .venv and configs/ play no part.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = "launch/torchrun.sh"
SBATCH = "launch/slurm/train.sbatch"
RUN_JOB = "launch/lib/run-job.sh"
BASH = shutil.which("bash")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with both scripts, the default config and the package folder, and no .venv."""
    root = tmp_path / "repo"
    for name in (TORCHRUN, SBATCH, RUN_JOB):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    (root / "configs").mkdir()
    (root / "configs/tiny-cpu.yaml").write_text("train_iters: 2\n")
    (root / "mhc_megatron").mkdir()
    return root.resolve()


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """Only the tools the scripts use, so that no real nvidia-smi, scontrol or srun is found."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dirname", "grep", "mktemp", "rm", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    return tools


def write_tool(path: Path, body: str, interpreter: str = BASH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(0o755)
    return path


def echo_args_tool(path: Path) -> Path:
    """A stand-in for python or srun: prints its arguments as JSON."""
    body = "import json, sys\nprint(json.dumps({'argv': sys.argv[1:]}))\n"
    return write_tool(path, body, sys.executable)


def run(repo: Path, script: str, args=(), cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run repo's copy of script with exactly env, from cwd (default: the repository root, as slurm would)."""
    return subprocess.run(
        [BASH, str(repo / script), *args], cwd=cwd or repo, env=env, capture_output=True, text=True, timeout=30
    )


def printed_command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[0]
    assert line.startswith("+ ")
    return shlex.split(line[2:])


def torchrun_argv(python, nnodes="1", node_rank="0", addr="localhost", port="29500", nproc="1", config="", overrides=()):
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", nnodes, "--node-rank", node_rank, "--master-addr", addr, "--master-port", port,
        "--nproc-per-node", nproc,
        "-m", "mhc_megatron.train", "--config", config, *overrides,
    ]  # fmt: skip


# --- launch/torchrun.sh ---------------------------------------------------------------------------------


def test_torchrun_defaults_without_gpus_or_venv(repo, bin_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(repo, TORCHRUN, cwd=elsewhere, PATH=str(bin_dir), DRY_RUN="1")
    assert printed_command(result) == torchrun_argv("python3", config=str(repo / "configs/tiny-cpu.yaml"))
    assert result.stdout.count("\n") == 1 and result.stderr == ""


def test_torchrun_uses_the_repository_venv(repo, bin_dir):
    venv_python = write_tool(repo / ".venv/bin/python", "exit 0\n")
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1"))
    assert argv[0] == str(venv_python)


def test_torchrun_counts_the_gpus_nvidia_smi_lists(repo, bin_dir):
    write_tool(
        bin_dir / "nvidia-smi",
        '[ "$1" = -L ] || exit 2\necho "GPU 0: NVIDIA H100 (UUID: GPU-a)"\necho "GPU 1: NVIDIA H100 (UUID: GPU-b)"\n',
    )
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1"))
    assert argv[argv.index("--nproc-per-node") + 1] == "2"


def test_torchrun_falls_back_to_one_process_when_nvidia_smi_fails(repo, bin_dir):
    write_tool(bin_dir / "nvidia-smi", 'echo "NVIDIA-SMI has failed: could not communicate with the driver"\nexit 9\n')
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1"))
    assert argv[argv.index("--nproc-per-node") + 1] == "1"


@pytest.mark.parametrize(("visible", "expected"), [("3,5,7", "3"), ("", "1")])
def test_torchrun_counts_cuda_visible_devices_before_nvidia_smi(repo, bin_dir, visible, expected):
    write_tool(bin_dir / "nvidia-smi", "for i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100\"; done\n")
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1", CUDA_VISIBLE_DEVICES=visible))
    assert argv[argv.index("--nproc-per-node") + 1] == expected


def test_torchrun_second_node_of_two(repo, bin_dir):
    env = dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="node7", MASTER_PORT="6000", NPROC_PER_NODE="4")
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1", **env))
    expected = torchrun_argv(
        "python3", nnodes="2", node_rank="1", addr="node7", port="6000", nproc="4", config="configs/tiny-cpu.yaml"
    )
    assert argv == expected


def test_torchrun_passes_overrides_through_in_order(repo, bin_dir):
    overrides = ["train_iters=100", "hc_mode=residual", "name=two words", "lr=3e-4"]
    argv = printed_command(run(repo, TORCHRUN, overrides, PATH=str(bin_dir), DRY_RUN="1"))
    config_at = argv.index("--config")
    assert argv[config_at - 2 : config_at] == ["-m", "mhc_megatron.train"]
    assert argv[config_at + 2 :] == overrides


def test_torchrun_config_paths(repo, bin_dir, tmp_path):
    (repo / "configs/gpu.yaml").write_text("")
    # found from the current directory: kept as given
    argv = printed_command(run(repo, TORCHRUN, cwd=repo, PATH=str(bin_dir), DRY_RUN="1", CONFIG="configs/gpu.yaml"))
    assert argv[argv.index("--config") + 1] == "configs/gpu.yaml"
    # not found from the current directory: the repository root's
    argv = printed_command(run(repo, TORCHRUN, cwd=tmp_path, PATH=str(bin_dir), DRY_RUN="1", CONFIG="configs/gpu.yaml"))
    assert argv[argv.index("--config") + 1] == str(repo / "configs/gpu.yaml")
    # absolute: kept
    absolute = tmp_path / "my config.yaml"
    absolute.write_text("")
    argv = printed_command(run(repo, TORCHRUN, PATH=str(bin_dir), DRY_RUN="1", CONFIG=str(absolute)))
    assert argv[argv.index("--config") + 1] == str(absolute)


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"NNODES": "two"}, [], "NNODES='two' is not valid: expected an integer >= 1"),
        ({"NNODES": "0"}, [], "NNODES='0' is not valid"),
        ({"NNODES": "2", "NODE_RANK": "2"}, [], "NODE_RANK='2' is not valid: expected an integer from 0 to 1"),
        ({"NODE_RANK": "-1"}, [], "NODE_RANK='-1' is not valid"),
        ({"MASTER_PORT": "70000"}, [], "MASTER_PORT='70000' is not valid: expected an integer from 1 to 65535"),
        ({"NPROC_PER_NODE": "0"}, [], "NPROC_PER_NODE='0' is not valid"),
        ({"MASTER_ADDR": "a b"}, [], "MASTER_ADDR='a b' is not valid"),
        ({"DRY_RUN": "yes"}, [], "DRY_RUN='yes' is not valid: expected 0 or 1"),
        ({"CONFIG": "configs/missing.yaml"}, [], "CONFIG='configs/missing.yaml' not found"),
        ({"CONFIG": "/no/such/config.yaml"}, [], "CONFIG='/no/such/config.yaml' not found"),
        ({}, ["train_iters=1", "train_iters"], "argument 'train_iters' is not valid: expected key=value"),
        ({}, ["=1"], "argument '=1' is not valid"),
    ],
)
def test_torchrun_names_a_bad_setting(repo, bin_dir, env, args, message):
    result = run(repo, TORCHRUN, args, PATH=str(bin_dir), **{"DRY_RUN": "1", **env})
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""


def test_torchrun_runs_the_command_it_prints(repo, bin_dir, tmp_path):
    fake_python = echo_args_tool(tmp_path / "fake bin/python")
    env = dict(PATH=str(bin_dir), PYTHON=str(fake_python), NPROC_PER_NODE="2")
    result = run(repo, TORCHRUN, ["train_iters=3", "name=a b"], **env)
    printed = printed_command(result)
    ran = json.loads(result.stdout.splitlines()[1])
    assert printed[0] == str(fake_python)
    assert ran["argv"] == printed[1:]


def status_writing_tool(path: Path, written: str, exit_status: int) -> Path:
    """A stand-in for torchrun: writes ``written`` to $MHC_EXIT_STATUS_FILE (as mhc-train's local rank
    0 does; nothing when empty) and exits with ``exit_status`` (torchrun's 1 after a worker failed)."""
    body = (f'[[ -n "{written}" ]] && echo "{written}" > "$MHC_EXIT_STATUS_FILE"\n'
            f'exit {exit_status}\n')
    return write_tool(path, body)


@pytest.mark.parametrize("written, exit_status, expected", [("75", 1, 75), ("0", 0, 0), ("", 1, 1), ("", 137, 137)])
def test_torchrun_exits_with_mhc_trains_status(repo, bin_dir, tmp_path, written, exit_status, expected):
    """mhc-train's own status when it wrote one (torchrun's 1 says only that a worker failed), else
    the command's; the status file is not left behind."""
    fake_python = status_writing_tool(tmp_path / "python", written, exit_status)
    (tmp_path / "tmp").mkdir()
    result = run(repo, TORCHRUN, PATH=str(bin_dir), PYTHON=str(fake_python), TMPDIR=str(tmp_path / "tmp"))
    assert result.returncode == expected, result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_sigterm_to_torchrun_sh_reaches_the_command(repo, bin_dir, tmp_path):
    """A scheduler or a user stopping the script stops the run through its exit signal, not by
    leaving it behind: the command gets SIGTERM and the script returns its status."""
    fake_python = write_tool(tmp_path / "python", 'trap \'echo 75 > "$MHC_EXIT_STATUS_FILE"; exit 1\' TERM\n'
                                                   'echo started\nwhile :; do sleep 0.05; done\n')
    bin_dir.joinpath("sleep").symlink_to(shutil.which("sleep"))
    script = subprocess.Popen([BASH, str(repo / TORCHRUN)], cwd=repo, stdout=subprocess.PIPE, text=True,
                              env=dict(PATH=str(bin_dir), PYTHON=str(fake_python)))
    assert script.stdout.readline().startswith("+ ") and script.stdout.readline() == "started\n"
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 75


def test_torchrun_names_a_missing_python(repo, bin_dir):
    result = run(repo, TORCHRUN, PATH=str(bin_dir), PYTHON="/no/such/python")
    assert result.returncode == 1
    assert "PYTHON='/no/such/python' is not an executable file" in result.stderr


# --- launch/slurm/train.sbatch --------------------------------------------------------------------------


def slurm_env(repo: Path, bin_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(
        PATH=str(bin_dir),
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-a1,gpu-a2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(repo),
    )
    return {**env, **extra}


def write_scontrol(bin_dir: Path, nodelist: str, addresses: dict[str, str]) -> Path:
    """A stand-in for scontrol: ``show hostnames NODELIST`` lists the hosts of ``addresses`` and
    ``show node HOST`` gives HOST's NodeAddr, among other fields, as slurm 22.05 prints them."""
    answers = [f'[ "$*" = "show hostnames {nodelist}" ] && {{ printf "%s\\n" {" ".join(addresses)}; exit 0; }}']
    for host, address in addresses.items():
        node = f"NodeName={host} Arch=x86_64 CoresPerSocket=1\n   CPUAlloc=0 CPUEfctv=2 CPUTot=2\n" \
               f"   NodeAddr={address} NodeHostName={host} Port=6818 Version=22.05.8\n   State=IDLE"
        answers.append(f'[ "$*" = "show node {host}" ] && {{ printf "{node}\\n"; exit 0; }}')
    return write_tool(bin_dir / "scontrol", "\n".join([*answers, 'echo "unexpected: scontrol $*" >&2; exit 3', ""]))


def sbatch_argv(python: str, config: str, nnodes="2", nproc="8", endpoint="gpu-a1:29500", job="4242", overrides=()):
    return [
        "srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        python, "-m", "torch.distributed.run",
        "--nnodes", nnodes, "--nproc-per-node", nproc,
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", job,
        "-m", "mhc_megatron.train", "--config", config, *overrides,
    ]  # fmt: skip


def test_sbatch_dry_run_without_scontrol(repo, bin_dir):
    venv_python = write_tool(repo / ".venv/bin/python", "exit 0\n")
    result = run(repo, SBATCH, ["train_iters=1000", "hc_mode=residual"], **slurm_env(repo, bin_dir, DRY_RUN="1"))
    expected = sbatch_argv(
        str(venv_python), str(repo / "configs/tiny-cpu.yaml"), overrides=["train_iters=1000", "hc_mode=residual"]
    )
    assert printed_command(result) == expected
    assert result.stderr == ""


@pytest.mark.parametrize(("address", "endpoint"), [("gpu-b07", "gpu-b07"), ("10.0.0.7", "10.0.0.7")],
                         ids=["address-is-the-host-name", "address-set-in-slurm-conf"])
def test_sbatch_takes_the_first_hosts_address_from_scontrol(repo, bin_dir, address, endpoint):
    write_scontrol(bin_dir, "gpu-b[07-08]", {"gpu-b07": address, "gpu-b08": "10.0.0.8"})
    env = slurm_env(repo, bin_dir, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-b[07-08]")
    argv = printed_command(run(repo, SBATCH, **env))
    assert argv[argv.index("--rdzv-endpoint") + 1] == f"{endpoint}:29500"


@pytest.mark.parametrize(
    ("node_answer", "message"),
    [("echo 'Node gpu-b07 not found' >&2; exit 1", "'scontrol show node gpu-b07' failed"),
     ("echo 'NodeName=gpu-b07 Arch=x86_64'", "'scontrol show node gpu-b07' gives no NodeAddr")],
    ids=["unknown-node", "no-address"],
)
def test_sbatch_names_a_node_scontrol_gives_no_address_of(repo, bin_dir, node_answer, message):
    answers = '[ "$2" = hostnames ] && { echo gpu-b07; echo gpu-b08; exit 0; }\n'
    write_tool(bin_dir / "scontrol", answers + node_answer + "\n")
    result = run(repo, SBATCH, **slurm_env(repo, bin_dir, DRY_RUN="1", SLURM_JOB_NODELIST="gpu-b[07-08]"))
    assert result.returncode == 1
    assert message in result.stderr and "set MASTER_ADDR to the address of gpu-b07" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4"}, "4"),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "2"}, "2"),
        ({"SLURM_GPUS_ON_NODE": ""}, "1"),
        ({"SLURM_GPUS_ON_NODE": "8", "NPROC_PER_NODE": "3"}, "3"),
    ],
)
def test_sbatch_processes_per_node(repo, bin_dir, extra, expected):
    argv = printed_command(run(repo, SBATCH, **slurm_env(repo, bin_dir, DRY_RUN="1", **extra)))
    assert argv[argv.index("--nproc-per-node") + 1] == expected


def test_sbatch_settings_from_the_environment(repo, bin_dir, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("")
    settings = dict(MASTER_ADDR="10.1.2.3", MASTER_PORT="6001", CONFIG=str(config), PYTHON="py")
    env = slurm_env(repo, bin_dir, DRY_RUN="1", **settings)
    assert printed_command(run(repo, SBATCH, ["a=1"], **env)) == sbatch_argv(
        "py", str(config), endpoint="10.1.2.3:6001", overrides=["a=1"]
    )


def test_sbatch_finds_the_repository_from_its_location_without_submit_dir(repo, bin_dir):
    env = slurm_env(repo, bin_dir, DRY_RUN="1")
    del env["SLURM_SUBMIT_DIR"]
    argv = printed_command(run(repo, SBATCH, cwd=repo / "launch", **env))
    assert argv[argv.index("--config") + 1] == str(repo / "configs/tiny-cpu.yaml")


def test_sbatch_refuses_to_run_outside_slurm(repo, bin_dir):
    result = run(repo, SBATCH, ["train_iters=1000"], PATH=str(bin_dir))
    assert result.returncode == 1
    assert "SLURM_JOB_ID is unset" in result.stderr and "submit it with sbatch" in result.stderr
    assert result.stdout == ""


def test_sbatch_dry_run_outside_slurm_says_what_to_set(repo, bin_dir):
    result = run(repo, SBATCH, PATH=str(bin_dir), DRY_RUN="1")
    assert result.returncode == 1
    assert "SLURM_JOB_ID, SLURM_NNODES and SLURM_JOB_NODELIST" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu-b[07-08]"}, "scontrol is not on PATH to expand it: set MASTER_ADDR"),
        ({"SLURM_JOB_NODELIST": "gpu-b[07-08]"}, "scontrol is not on PATH"),
        ({"DRY_RUN": "1", "SLURM_NNODES": "x"}, "SLURM_NNODES='x' is not valid"),
        ({"DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:x"}, "SLURM_GPUS_PER_NODE='h100:x'"),
        ({"DRY_RUN": "1", "MASTER_PORT": "port"}, "MASTER_PORT='port' is not valid"),
        ({"DRY_RUN": "1", "CONFIG": "configs/missing.yaml"}, "CONFIG='configs/missing.yaml' not found"),
    ],
)
def test_sbatch_names_a_bad_setting(repo, bin_dir, extra, message):
    result = run(repo, SBATCH, **slurm_env(repo, bin_dir, **extra))
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""


def test_sbatch_runs_the_srun_command_it_prints(repo, bin_dir):
    echo_args_tool(bin_dir / "srun")
    write_scontrol(bin_dir, "gpu-c[1-2]", {"gpu-c1": "gpu-c1", "gpu-c2": "gpu-c2"})
    result = run(repo, SBATCH, ["train_iters=5"], **slurm_env(repo, bin_dir, SLURM_JOB_NODELIST="gpu-c[1-2]"))
    printed = printed_command(result)
    ran = json.loads(result.stdout.splitlines()[1])
    assert printed[0] == "srun" and ran["argv"] == printed[1:]
    assert printed[printed.index("--rdzv-endpoint") + 1] == "gpu-c1:29500"


@pytest.mark.parametrize("written, requeue, requeued", [("75", "1", True), ("75", "0", False), ("3", "1", False)])
def test_sbatch_requeues_a_run_that_stopped_after_saving(repo, bin_dir, tmp_path, written, requeue, requeued):
    """Exit status 75 (interrupted, saved) with REQUEUE=1: `scontrol requeue JOB`; the script exits
    with mhc-train's status either way."""
    status_writing_tool(bin_dir / "srun", written, 1)
    write_tool(bin_dir / "scontrol", f'echo "$*" >> "{tmp_path / "scontrol.log"}"\n')
    result = run(repo, SBATCH, **slurm_env(repo, bin_dir, MASTER_ADDR="gpu-a1", REQUEUE=requeue,
                                           TMPDIR=str(tmp_path)))
    assert result.returncode == int(written), result.stderr
    calls = (tmp_path / "scontrol.log").read_text().splitlines() if requeued else []
    assert calls == (["requeue 4242"] if requeued else [])
    assert not (tmp_path / "scontrol.log").exists() or requeued
    assert ("requeueing job 4242" in result.stderr) == requeued


def test_sbatch_hands_cpus_per_task_to_srun(repo, bin_dir):
    write_tool(bin_dir / "srun", 'echo "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK"\n')
    result = run(repo, SBATCH, **slurm_env(repo, bin_dir, SLURM_CPUS_PER_TASK="32", MASTER_ADDR="gpu-a1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == "SRUN_CPUS_PER_TASK=32"


# --- both -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TORCHRUN, SBATCH])
def test_scripts_are_executable_bash_with_usage(script, bin_dir):
    path = ROOT / script
    assert os.access(path, os.X_OK)
    assert subprocess.run([BASH, "-n", str(path)], capture_output=True).returncode == 0
    usage = subprocess.run([BASH, str(path), "--help"], env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert usage.returncode == 0 and "DRY_RUN" in usage.stdout and "#" not in usage.stdout.splitlines()[0]

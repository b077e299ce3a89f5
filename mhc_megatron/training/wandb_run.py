"""A run's Weights & Biases run: offline unless an API key says it can go online, one W&B run per
``run_dir`` (a resumed run continues it), and a note in ``run_dir/wandb`` on how to upload it.

Mode: ``WANDB_MODE`` when set (``online``, ``offline``, ``disabled``); otherwise ``online`` when an
API key is set (``WANDB_API_KEY``, or a ``wandb login`` entry in ``~/.netrc`` for the host of
``WANDB_BASE_URL``), else ``offline``: on a cluster without internet nothing asks to log in or
waits on the network, and ``wandb sync`` uploads the run later.

The package is an optional extra (``pip install -e .[wandb]``); ``wandb=true`` without it is a
config error (``check_wandb_installed``), raised before any process group starts.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"
SYNC_NOTE = "HOW-TO-SYNC.txt"
_RUN_ID_FILE = "run-id"


def check_wandb_installed() -> None:
    """Raise ``ValueError`` when the ``wandb`` package cannot be imported."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("wandb=true needs the wandb package, which is not installed: "
                         "pip install -e '.[wandb]' (make test installs it), or set wandb=false")


def has_api_key(environ: dict[str, str] | None = None) -> bool:
    """Whether W&B would find credentials: ``WANDB_API_KEY``, or a ``~/.netrc`` (``$NETRC``) entry
    for the host of ``WANDB_BASE_URL``."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname
    path = Path(environ.get("NETRC", Path(environ.get("HOME", "~")).expanduser() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(environ: dict[str, str] | None = None) -> str:
    """``WANDB_MODE`` when set, else ``online`` with an API key and ``offline`` without."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if has_api_key(environ) else "offline"


def start_wandb_run(run_dir: Path, project: str, config: dict, resuming: bool):
    """The W&B run of ``run_dir`` (files under ``run_dir/wandb``), logging ``config``. Its id is kept
    in ``run_dir/wandb/run-id``: a resumed run (``resuming``) continues the same W&B run."""
    import wandb

    directory = run_dir / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    id_file = directory / _RUN_ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else secrets.token_hex(6)
    id_file.write_text(run_id + "\n")
    mode = wandb_mode()
    run = wandb.init(project=project, dir=str(run_dir), config=config, mode=mode, name=run_dir.name, id=run_id,
                     resume="allow")
    if mode == "offline":
        _write_sync_note(directory, Path(run.dir).parent)
    return run


def where_logged(run) -> str:
    """One line for the end of the run: the offline run directory and the upload command, or the URL."""
    mode = run.settings.mode
    if mode == "offline":
        offline_run = Path(run.dir).parent
        return f"W&B: offline run {offline_run}; upload it with: wandb sync {offline_run}"
    return f"W&B: {run.url}" if mode == "online" else f"W&B: {mode} (WANDB_MODE)"


def _write_sync_note(directory: Path, offline_run: Path) -> None:
    note = directory / SYNC_NOTE
    lines = note.read_text().splitlines() if note.is_file() else [
        "This run was logged to Weights & Biases offline (no API key, or WANDB_MODE=offline).",
        "Upload it from a machine with internet access, after `wandb login`:",
        "",
        f"    wandb sync {directory}/offline-run-*",
        "",
        "Its offline parts (one per start of the run; a resumed run continues the same W&B run):",
    ]
    lines.append(f"    {offline_run}")
    note.write_text("\n".join(lines) + "\n")

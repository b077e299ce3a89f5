"""``wandb=true``: a run writes an offline W&B run with the records of metrics.jsonl and the resolved
config, touches no network without an API key, says how to upload it, and a resumed run continues
the same W&B run; ``wandb=true`` without the package is a config error."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import yaml
from wandb.proto import wandb_internal_pb2 as wandb_proto

from mhc_megatron.training.wandb_run import SYNC_NOTE, check_wandb_installed, wandb_mode

from .conftest import TINY, read_metrics, run_train


# The framing of a .wandb file: a 7-byte header, then LevelDB-log records (crc32 u32, length u16,
# type u8, payload) in 32 KiB blocks; a record that does not fit a block is split FIRST/MIDDLE/LAST.
BLOCK, FULL, FIRST, MIDDLE, LAST = 32768, 1, 2, 3, 4


def wandb_file_records(path: Path) -> list:
    """The protobuf ``Record``s of the ``.wandb`` file ``path`` (checksums not verified)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file: {data[:7]!r}"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-padded tail
            position += left
            continue
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_proto.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def nested(items) -> dict:
    """A dict from W&B's ``(nested_key or key, value_json)`` items."""
    out: dict = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        target = out
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = json.loads(item.value_json)
    return out


def offline_run(run_dir: Path, number: int) -> tuple[Path, list]:
    """The ``number``-th (from 0) offline run directory of ``run_dir`` and its records."""
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) > number, f"offline runs in {run_dir / 'wandb'}: {parts}"
    (wandb_file,) = parts[number].glob("run-*.wandb")
    return parts[number], wandb_file_records(wandb_file)


def history(records) -> list[dict]:
    """The logged records, without W&B's own ``_step``, ``_runtime``, ``_timestamp``."""
    rows = [nested(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No API key, no ~/.netrc, no WANDB_MODE: what a cluster node without W&B set up has."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))


def test_a_run_logs_its_records_and_config_offline_and_the_resumed_run_continues_it(dataset, tmp_path,
                                                                                    no_credentials):
    run_dir, save = tmp_path / "run", tmp_path / "checkpoints"
    common = [*TINY, f"data_path={dataset}", f"data_dir={tmp_path / 'data'}", "eval_interval=2", "eval_iters=1",
              "gain_profile_interval=2", "wandb=true", "wandb_project=mhc-tests", f"run_dir={run_dir}", f"save={save}"]
    first = run_train(*common, "train_iters=3")
    part, records = offline_run(run_dir, 0)
    assert f"W&B: offline run {part}; upload it with: wandb sync {part}" in first.stdout

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "mhc-tests" and run.display_name == "run"
    config = {k: v for k, v in nested(run.config.update).items() if k != "_wandb"}
    assert config == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert history(records) == read_metrics(run_dir)
    assert isinstance(history(records)[0]["gain_profile"]["forward_max"], list)  # nested values arrive as logged
    note = (run_dir / "wandb" / SYNC_NOTE).read_text()
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in note and str(part) in note

    run_train(*common, "train_iters=5", f"load={save}")
    second_part, second_records = offline_run(run_dir, 1)
    (resumed,) = [r.run for r in second_records if r.WhichOneof("record_type") == "run"]
    assert resumed.run_id == run.run_id
    assert history(second_records) == read_metrics(run_dir)[3:]
    assert [row["step"] for row in history(second_records)] == [4, 5]
    assert str(second_part) in (run_dir / "wandb" / SYNC_NOTE).read_text()


def test_the_mode_is_offline_without_credentials(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home)}
    assert wandb_mode(bare) == "offline"
    assert wandb_mode({**bare, "WANDB_API_KEY": "k" * 40}) == "online"
    assert wandb_mode({**bare, "WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode({**bare, "WANDB_MODE": "disabled"}) == "disabled"
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode(bare) == "online"  # `wandb login` writes this entry
    assert wandb_mode({**bare, "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"  # another server
    (home / ".netrc").write_text("machine api.wandb.ai login user passwd k")  # unparsable: no credentials
    assert wandb_mode(bare) == "offline"


def test_wandb_true_without_the_package_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"wandb=true needs the wandb package.*pip install -e '\.\[wandb\]'"):
        check_wandb_installed()

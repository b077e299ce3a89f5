"""``mhc-train`` end to end on CPU/gloo: layouts against one process, exact resume, bad input."""

import pytest

from .conftest import TINY, assert_same_training, read_metrics, run_train, train_four_steps


@pytest.fixture(scope="module")
def single_process(initial_weights, dataset, tmp_path_factory):
    """One process, starting from the saved initial weights (``finetune``)."""
    return train_four_steps(dataset, tmp_path_factory.mktemp("single"), f"load={initial_weights}", "finetune=true")


@pytest.mark.parametrize(
    "layout",
    [["tensor_model_parallel_size=2"], ["pipeline_model_parallel_size=2"],
     ["pipeline_model_parallel_size=2", "overlap_p2p_comm=true"]],
    ids=["tp2", "pp2", "pp2-overlapped"],
)
def test_two_processes_match_one(layout, single_process, dataset, tmp_path):
    """Each layout starts from the seed alone: the same initial model as the saved one."""
    parallel = train_four_steps(dataset, tmp_path, *layout, nproc=2)
    assert [r["step"] for r in parallel] == [1, 2, 3, 4]
    assert all(("p2p_blocked_s" in r) == ("pipeline_model_parallel_size=2" in layout) for r in parallel)
    assert_same_training(parallel, single_process)  # the gain profile: every stage's sub-layers, in order (PP = 2)
    assert single_process[-1]["loss"] < single_process[0]["loss"]
    assert all(r["amax_gain_backward"] > 1.01 for r in single_process if "amax_gain_backward" in r)


def test_the_gain_profile_is_logged_on_the_probe_batch(single_process):
    """After steps 1, 2 (the interval) and 4 (the last): one value per sub-layer (4 layers x 2),
    the whole model's gain is the last depth's, and the max over tokens bounds the mean."""
    profiled = [r for r in single_process if "gain_profile" in r]
    assert [r["step"] for r in profiled] == [1, 2, 4]
    for record in profiled:
        profile = record["gain_profile"]
        assert sorted(profile) == ["backward_max", "backward_mean", "forward_max", "forward_mean"]
        assert all(len(values) == 8 for values in profile.values())
        assert record["gain_forward_max"] == profile["forward_max"][-1]
        assert record["gain_backward_max"] == profile["backward_max"][-1]
        for reduction in ("forward", "backward"):
            assert all(m >= a for m, a in zip(profile[f"{reduction}_max"], profile[f"{reduction}_mean"]))
        # one Sinkhorn iteration: rows exact, columns off by a little that compounds with depth
        assert profile["forward_max"] == pytest.approx([1.0] * 8, abs=1e-5)
        assert min(profile["backward_max"]) > 1.0


def test_resume_gives_the_uninterrupted_losses(dataset, tmp_path):
    """Stop after step 3 and resume, with dropout on: the losses of 6 uninterrupted steps (one
    process; two data-parallel ranks with the distributed optimizer: tests/training/test_interruptions.py)."""
    common = [*TINY, f"data_path={dataset}", "train_iters=6", "eval_interval=3", "eval_iters=1",
              "hidden_dropout=0.1", f"data_dir={tmp_path / 'data'}"]
    run_train(*common, f"run_dir={tmp_path / 'whole'}")
    save = tmp_path / "checkpoints"
    run_train(*common, f"run_dir={tmp_path / 'parts'}", f"save={save}", "exit_interval=3")
    resumed = run_train(*common, f"run_dir={tmp_path / 'parts'}", f"save={save}", f"load={save}")
    assert "resuming after step 3" in resumed.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "6\n"
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "eval_loss", "amax_gain_backward"):
        assert [r.get(key) for r in parts] == [r.get(key) for r in whole], key


def test_unknown_key_names_the_closest(tmp_path):
    result = run_train(*TINY, "hiden_size=64", f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert "unknown config key 'hiden_size'" in result.stderr and "did you mean 'hidden_size'" in result.stderr


def test_missing_dataset_is_a_clear_error(tmp_path):
    result = run_train(*TINY, f"data_path={tmp_path / 'absent'}", f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert f"{tmp_path / 'absent'}.idx does not exist" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_corrupt_dataset_is_a_clear_error(dataset, tmp_path):
    corrupt = tmp_path / "cut"
    corrupt.with_suffix(".idx").write_bytes(dataset.with_suffix(".idx").read_bytes())
    corrupt.with_suffix(".bin").write_bytes(dataset.with_suffix(".bin").read_bytes()[:1000])
    result = run_train(*TINY, f"data_path={corrupt}", f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert "is truncated" in result.stderr


def test_saving_over_another_runs_checkpoints_is_refused(initial_weights, dataset, tmp_path):
    result = run_train(*TINY, f"data_path={dataset}", f"save={initial_weights}", f"run_dir={tmp_path}",
                       expect_success=False)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr


def test_missing_checkpoint_is_a_clear_error(dataset, tmp_path):
    result = run_train(*TINY, f"data_path={dataset}", f"load={tmp_path / 'absent'}", f"run_dir={tmp_path}",
                       expect_success=False)
    assert result.returncode == 2
    assert f"checkpoint directory '{tmp_path / 'absent'}' (load) does not exist" in result.stderr


def test_corrupt_checkpoint_tracker_is_a_clear_error(dataset, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("ten\n")
    result = run_train(*TINY, f"data_path={dataset}", f"load={tmp_path / 'ckpt'}", f"run_dir={tmp_path / 'run'}",
                       expect_success=False)
    assert result.returncode == 2
    assert "must hold an iteration number, got 'ten'" in result.stderr


def test_writing_over_another_runs_metrics_is_refused(dataset, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = run_train(*TINY, f"data_path={dataset}", f"run_dir={tmp_path}", expect_success=False)
    assert result.returncode == 2
    assert "already holds the metrics of another run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'

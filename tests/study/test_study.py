"""``mhc-study``: the study file, the resumable runner (with a stand-in for the trainer), the numbers
and the report. tests/training/test_study_command.py runs it with the real trainer."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from mhc_megatron.study import runner
from mhc_megatron.study.analysis import analyse_study, seed_spread, spike_steps
from mhc_megatron.study.config import StudyConfig
from mhc_megatron.study.report import write_report
from mhc_megatron.training.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAIN = Path(__file__).with_name("fake_train.py")


def write_study(path: Path, study: dict, training: dict | None = None) -> Path:
    training = training if training is not None else {"train_iters": 4, "lr": 1.0e-3, "min_lr": 1.0e-4}
    path.write_text(yaml.safe_dump({"study": study, "training": training}))
    return path


def test_the_shipped_cpu_study_lists_its_runs():
    config = StudyConfig.load(REPO / "configs/studies/stability-cpu.yaml")
    runs = config.runs()
    assert len(runs) == 3 * 3 + 2 * 3
    assert [r.name for r in runs[:3]] == ["residual-lr2.0e-03-seed1234", "hc-lr2.0e-03-seed1234", "mhc-lr2.0e-03-seed1234"]
    sweep = [r for r in runs if r.part == "sweep"]
    assert {r.seed for r in sweep} == {1234} and {r.lr for r in sweep} == {5.0e-4, 8.0e-3}
    assert all(r.min_lr == pytest.approx(r.lr / 10) for r in runs)  # the schedule's shape at every rate
    assert StudyConfig.load(REPO / "configs/studies/stability-gpu.yaml").runs()


@pytest.mark.parametrize("name", ["stability-cpu", "stability-gpu"])
@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
def test_the_shipped_studies_train_valid_configs(name, mode):
    config = StudyConfig.load(REPO / f"configs/studies/{name}.yaml")
    run = RunConfig.from_mapping({**config.training, "hc_mode": mode}, where=name)
    assert run.transformer_config().hc_mode == mode and run.training.gain_profile_interval > 0


@pytest.mark.parametrize(
    "study, training, message",
    [
        ({"seeds": [1], "repeats": 2}, None, r"unknown study key\(s\) \['repeats'\]"),
        ({"seeds": []}, None, "study.seeds must be a non-empty list"),
        ({"seeds": [1, 1]}, None, "study.seeds repeats a value"),
        ({"seeds": [1], "modes": ["hc", "moe"]}, None, "study.modes must be a list of distinct modes"),
        ({"seeds": [1], "sweep_lrs": [1.0e-3]}, None, "sweep_lrs repeats the base rate"),
        ({"seeds": [1], "spike_ratio": 0.5}, None, "study.spike_ratio must be >= 1.0"),
        ({"seeds": [1]}, {"lr": 1.0e-3, "hc_mode": "hc"}, r"training key\(s\) \['hc_mode'\] are set by the study"),
        ({"seeds": [1]}, {"train_iters": 4}, "training.lr must be a number > 0"),
    ],
)
def test_a_bad_study_file_names_the_key(tmp_path, study, training, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.load(write_study(tmp_path / "study.yaml", study, training))


def test_spikes_are_counted_once_each_against_the_running_median():
    losses = [5.0, 4.0, 3.0, 3.0, 6.0, 7.0, 3.0, None, 2.9, 4.0]
    # window 3, ratio 1.2: step 5 (6 > 1.2 x 3) starts a spike that step 6 continues; step 10 (4 > 1.2 x 3)
    assert spike_steps(list(range(1, 11)), losses, ratio=1.2, window=3) == [5, 10]


@pytest.fixture
def fake_trainer(monkeypatch):
    """The runner trains with ``fake_train.py`` instead of mhc_megatron.train."""
    def command(config, overrides, mode, run_dir, nproc_per_node):
        return [sys.executable, str(FAKE_TRAIN), *overrides, f"hc_mode={mode}", f"run_dir={run_dir}"]
    monkeypatch.setattr(runner, "training_command", command)


def test_a_stopped_study_resumes_and_a_diverged_run_is_a_result(fake_trainer, tmp_path, monkeypatch, capfd):
    config = StudyConfig.load(write_study(tmp_path / "study.yaml", {"seeds": [1, 2], "modes": ["residual", "hc", "mhc"]}))
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_TRAIN_ENDINGS", "hc=3,mhc=75")
    with pytest.raises(runner.StudyStopped) as stopped:
        runner.run_study(config, out)
    assert stopped.value.code == 75
    assert [runner.read_outcome(out, run) for run in config.runs()[:3]] == [
        {"status": "completed", "exit_status": 0, "seconds": pytest.approx(0, abs=30)},
        {"status": "diverged", "exit_status": 3, "seconds": pytest.approx(0, abs=30)},
        None,
    ]
    assert not (out / "checkpoints" / "hc-lr1.0e-03-seed1").exists()  # removed once the run ended
    capfd.readouterr()

    monkeypatch.setenv("FAKE_TRAIN_ENDINGS", "hc=3")  # no more interruptions
    runner.run_study(config, out)  # again: skips the ended runs, resumes mHC after its step 2
    printed = capfd.readouterr().out
    assert "# run 1/6 residual-lr1.0e-03-seed1: completed earlier, skipped" in printed
    assert "# run 3/6 mhc-lr1.0e-03-seed1 (resuming" in printed and "fake run mhc seed 1: steps 3-4" in printed
    results = analyse_study(config, out)
    assert [r.status for r in results] == ["completed", "diverged", "completed"] * 2
    mhc = results[2]
    assert mhc.steps == [1, 2, 3, 4] and mhc.gain_steps == [2, 4] and mhc.max_gain_forward == 1.0
    assert results[1].max_gain_forward == 4.0 and results[1].max_gain_backward == 2.0
    assert seed_spread(results, "mhc") == {"mean": 4.5, "std": 0.0, "min": 4.5, "max": 4.5, "count": 2}
    assert seed_spread(results, "hc") is None  # diverged runs are no final losses


def test_a_failed_run_stops_the_study_naming_it(fake_trainer, tmp_path, monkeypatch):
    config = StudyConfig.load(write_study(tmp_path / "study.yaml", {"seeds": [1], "modes": ["hc"]}))
    monkeypatch.setenv("FAKE_TRAIN_ENDINGS", "hc=2")
    with pytest.raises(runner.StudyStopped, match="run hc-lr1.0e-03-seed1 failed with exit code 2"):
        runner.run_study(config, tmp_path / "out")


def test_a_study_directory_of_other_settings_is_refused(fake_trainer, tmp_path):
    out = tmp_path / "out"
    runner.write_training_file(StudyConfig.load(write_study(tmp_path / "a.yaml", {"seeds": [1]})), out)
    other = StudyConfig.load(write_study(tmp_path / "b.yaml", {"seeds": [1]}, {"lr": 1.0e-3, "train_iters": 8}))
    with pytest.raises(runner.StudyStopped, match=r"training keys \['min_lr', 'train_iters'\] differ"):
        runner.run_study(other, out)


def test_the_report_holds_the_runs_numbers(fake_trainer, tmp_path, monkeypatch):
    config = StudyConfig.load(write_study(tmp_path / "study.yaml", {"seeds": [1], "sweep_lrs": [3.0e-3]}))
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_TRAIN_ENDINGS", "hc=3")
    runner.run_study(config, out)
    report = write_report(config, out)
    assert sorted(p.name for p in report.parent.iterdir()) == [
        "gain_depth.png", "gain_steps.png", "grad_norm.png", "loss.png", "lr_sweep.png", "report.md", "study.json"]
    summary = json.loads((report.parent / "study.json").read_text())
    assert [r["name"] for r in summary["runs"]][-1] == "mhc-lr3.0e-03-seed1"
    assert summary["runs"][1]["profiles"]["4"]["forward_max"] == [1.0, 4.0]
    text = report.read_text()
    assert "| hc-lr1.0e-03-seed1 | diverged | 4.5000 |" in text
    assert "| mHC | 4.5000 | 0.0000 | 4.5000 | 4.5000 | 1 |" in text

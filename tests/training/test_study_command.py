"""``mhc-study`` end to end with the real trainer: one HC run of 2 steps with the probe after each."""

import json

import yaml

from mhc_megatron.study.cli import main


def test_the_command_trains_a_tiny_study_and_reports_it(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    training = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 2, "lr": 1.0e-3, "eval_interval": 2,
                "eval_iters": 1, "gain_profile_interval": 1, "data_path": str(dataset)}
    study = tmp_path / "tiny.yaml"
    study.write_text(yaml.safe_dump({"study": {"seeds": [7], "modes": ["hc"]}, "training": training}))
    main(["--config", str(study)])
    summary = json.loads((tmp_path / "runs/study-tiny/report/study.json").read_text())
    (run,) = summary["runs"]
    assert run["status"] == "completed" and run["steps"] == [1, 2] and run["gain_steps"] == [1, 2]
    assert len(run["profiles"]["2"]["forward_max"]) == 4  # 2 layers x 2 sub-layers
    assert run["max_gain_forward"] >= run["profiles"]["1"]["forward_max"][-1] > 0
    assert not (tmp_path / "runs/study-tiny/checkpoints/hc-lr1.0e-03-seed7").exists()
    capsys.readouterr()
    main(["--config", str(study), "--report-only"])
    assert "report: runs/study-tiny/report/report.md" in capsys.readouterr().out

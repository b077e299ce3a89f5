"""The mode comparison: metrics loading, summaries, overheads, the written report, its model-scale
section and the mhc-compare CLI.

The run directories are synthetic, with numbers chosen so that every median and overhead is exact
in binary floating point: residual steps take 0.5 s, mhc 0.625 s (+25 %), hc 0.75 s (+50 %).
"""

import json
import os
import re
import runpy
import shlex
import sys
import textwrap
from dataclasses import replace

import pytest
from matplotlib.image import imread

from mhc_megatron.compare import RunSummary, load_metrics, overheads, summarize, write_report
from mhc_megatron.compare import cli, scale
from mhc_megatron.plan.evaluate import evaluate
from mhc_megatron.plan.hardware import cluster
from mhc_megatron.plan.model import Layout, ModelSpec, model_from_yaml

MIB = 2**20
STEPS, WARMUP = 10, 2
STEP_TIME = {"residual": 0.5, "hc": 0.75, "mhc": 0.625}
PEAK_MIB = {"residual": 1000, "hc": 2000, "mhc": 1500}
# The last logged (forward, backward); mHC's forward gain is 1 by construction, its backward gain is not.
GAINS = {"hc": (40.0, 30.0), "mhc": (1.0, 1.25)}
CONFIG = {
    "num_layers": 4,
    "hidden_size": 64,
    "num_streams": 4,
    "train_iters": STEPS,
    "micro_batch_size": 2,
    "global_batch_size": 8,
    "seq_length": 32,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "bf16": False,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def step_record(mode, step):
    """Step ``step`` of a synthetic ``mode`` run: slow warm-up steps, one outlier the median ignores."""
    step_time = 9.0 if step <= WARMUP or step == 7 else STEP_TIME[mode]
    record = {
        "step": step,
        "loss": 10.0 - 0.5 * step,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "step_time_s": step_time,
        "tokens_per_s": 1000 / step_time,
        "peak_mem_bytes": (PEAK_MIB[mode] - (100 if step <= WARMUP else 0)) * MIB,
    }
    if step % 5 == 0:
        record["eval_loss"] = record["loss"] + 0.25
        if mode in GAINS:
            forward, backward = GAINS[mode]
            last = step == STEPS
            record["amax_gain_forward"] = forward if last else 2 * forward
            record["amax_gain_backward"] = backward if last else 2 * backward
    return record


def write_run(run_dir, mode, records=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps({**CONFIG, "hc_mode": mode, "run_dir": str(run_dir)}))
    records = records if records is not None else [step_record(mode, step) for step in range(1, STEPS + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def write_runs(root, modes=("residual", "hc", "mhc")):
    return {mode: write_run(root / mode, mode) for mode in modes}


def test_summary_numbers(tmp_path):
    runs = write_runs(tmp_path)
    assert summarize(runs["residual"], WARMUP) == RunSummary(
        steps=10,
        measured_steps=8,
        median_step_time_s=0.5,
        median_tokens_per_s=2000.0,
        median_peak_mem_bytes=1000.0 * MIB,
        first_loss=9.5,
        last_loss=5.0,
        last_eval_loss=5.25,
        amax_gain_forward=None,
        amax_gain_backward=None,
    )
    mhc = summarize(runs["mhc"], WARMUP)
    assert (mhc.median_step_time_s, mhc.median_tokens_per_s, mhc.median_peak_mem_bytes) == (0.625, 1600.0, 1500.0 * MIB)
    assert (mhc.amax_gain_forward, mhc.amax_gain_backward) == (1.0, 1.25)


def test_warmup_leaves_out_steps_by_number(tmp_path):
    times = [4.0, 3.0, 1.0, 2.0]
    records = [
        {"step": step, "loss": 1.0, "step_time_s": time, "tokens_per_s": 1.0, "peak_mem_bytes": 1}
        for step, time in enumerate(times, start=1)
    ]
    run = write_run(tmp_path / "residual", "residual", records)
    assert [summarize(run, warmup).median_step_time_s for warmup in (0, 1, 3)] == [2.5, 2.0, 2.0]
    assert [summarize(run, warmup).measured_steps for warmup in (0, 1, 3)] == [4, 3, 1]


def test_overheads_are_percent_over_residual(tmp_path):
    runs = write_runs(tmp_path)
    costs = overheads({mode: summarize(run, WARMUP) for mode, run in runs.items()})
    assert (costs["residual"].step_time_percent, costs["residual"].memory_percent) == (0.0, 0.0)
    assert (costs["mhc"].step_time_percent, costs["mhc"].memory_percent) == (25.0, 50.0)
    assert (costs["hc"].step_time_percent, costs["hc"].memory_percent) == (50.0, 100.0)


def test_report_table_config_and_plots(tmp_path):
    runs = write_runs(tmp_path / "runs")
    report = write_report(runs, tmp_path / "out", WARMUP)
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    assert text.startswith("# Hyper-connection comparison: residual vs hc vs mhc\n")
    for line in (
        "- Model: 4 layers, hidden size 64",
        "- Streams n: 4",
        "- Training steps: 10",
        "- Batch: micro 2, global 8",
        "- Sequence length: 32",
        "- Parallelism: TP 1, PP 1",
        "- Precision: fp32",
        "All runs share this config; only hc_mode and run_dir differ.",
        "| `residual` | 10 (8) | 500.0 | 2,000 | baseline | 1,000.0 | baseline | 9.5000 | 5.0000 | 5.2500 | n/a | n/a |",
        "| `hc` | 10 (8) | 750.0 | 1,333 | +50.0 % | 2,000.0 | +100.0 % | 9.5000 | 5.0000 | 5.2500 | 40.0000 | 30.0000 |",
        "| `mhc` | 10 (8) | 625.0 | 1,600 | +25.0 % | 1,500.0 | +50.0 % | 9.5000 | 5.0000 | 5.2500 | 1.0000 | 1.2500 |",
        "![Amax gain per step](amax_gain.png)",
    ):
        assert line in text.splitlines()
    assert "medians over the steps after the first 2 (warm-up)" in text
    assert "on CPU it is the process's peak resident set size" in text
    for name in ("loss.png", "step_time.png", "memory.png", "amax_gain.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        height, width, _ = imread(tmp_path / "out" / name).shape
        assert height > 100 and width > 100


def test_report_without_gains_has_no_gain_plot(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "amax_gain.png").write_bytes(b"stale")
    write_report({"residual": write_run(tmp_path / "residual", "residual")}, out, WARMUP)
    assert not (out / "amax_gain.png").exists()
    assert "No run logged Amax gains (only `hc` and `mhc` runs do), so there is no `amax_gain.png`." in (
        (out / "report.md").read_text()
    )


def test_report_names_config_differences(tmp_path):
    runs = write_runs(tmp_path, ("residual", "mhc"))
    config = json.loads((runs["mhc"] / "config.yaml").read_text())
    (runs["mhc"] / "config.yaml").write_text(json.dumps({**config, "seq_length": 64}))
    text = write_report(runs, tmp_path / "out", WARMUP).read_text()
    assert "The configs differ beyond hc_mode and run_dir: `mhc` has seq_length=64 (residual: 32)." in text


def test_report_needs_the_residual_baseline(tmp_path):
    runs = write_runs(tmp_path, ("hc", "mhc"))
    with pytest.raises(ValueError, match=r"the baseline mode 'residual' is missing: got modes \['hc', 'mhc'\]"):
        write_report(runs, tmp_path / "out", WARMUP)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no metrics file {tmp_path / 'metrics.jsonl'}")):
        load_metrics(tmp_path)


def test_corrupt_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "residual", "residual")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:20]  # a line cut short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3 is not valid JSON")):
        load_metrics(run)
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
    expected = f"{path}:2 must be a JSON object with an integer 'step' >= 1, got '[1, 2]'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_metrics(run)
    path.write_text('{"step": 1, "loss": "high"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: step 1 has loss='high', expected a number")):
        summarize(run, 0)


def test_repeated_steps_keep_the_last(tmp_path):
    first = [step_record("residual", step) for step in range(1, 9)]
    resumed = [{**step_record("residual", step), "loss": 1.0 * step} for step in range(6, 11)]
    run = write_run(tmp_path / "residual", "residual", first)
    with (run / "metrics.jsonl").open("a") as metrics:  # a blank line, then the resumed run's steps
        metrics.write("\n" + "".join(json.dumps(record) + "\n" for record in resumed))
    records = load_metrics(run)
    assert [record["step"] for record in records] == list(range(1, 11))
    assert [record["loss"] for record in records[4:]] == [7.5, 6.0, 7.0, 8.0, 9.0, 10.0]
    summary = summarize(run, WARMUP)
    assert (summary.steps, summary.first_loss, summary.last_loss) == (10, 9.5, 10.0)


def test_warmup_longer_than_the_run(tmp_path):
    run = write_run(tmp_path / "residual", "residual")
    path = run / "metrics.jsonl"
    expected = f"warmup_steps=10 leaves no step to measure in {path}, which logged 10 steps up to step 10"
    with pytest.raises(ValueError, match=re.escape(expected)):
        summarize(run, 10)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0, got -1"):
        summarize(run, -1)


def dry_run(tmp_path, capsys, *args):
    config = tmp_path / "tiny.yaml"
    config.write_text("num_layers: 2\n")
    cli.main(["--config", str(config), "--out", str(tmp_path / "out"), "--dry-run", *args])
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def test_dry_run_prints_one_command_per_mode(tmp_path, capsys):
    commands = dry_run(tmp_path, capsys, "train_iters=20", "seed=3", "--modes", "residual,mhc")
    config, out = str(tmp_path / "tiny.yaml"), tmp_path / "out"
    assert commands == [
        [sys.executable, "-m", "mhc_megatron.train", "--config", config, "train_iters=20", "seed=3",
         "hc_mode=residual", f"run_dir={out / 'residual'}"],
        [sys.executable, "-m", "mhc_megatron.train", "--config", config, "train_iters=20", "seed=3",
         "hc_mode=mhc", f"run_dir={out / 'mhc'}"],
    ]  # fmt: skip
    assert not out.exists()


def test_dry_run_with_several_processes_uses_torch_distributed_run(tmp_path, capsys):
    commands = dry_run(tmp_path, capsys, "--nproc-per-node", "2")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    for command, mode in zip(commands, ("residual", "hc", "mhc"), strict=True):
        assert command[:7] == [*launcher, "-m", "mhc_megatron.train"]
        assert command[-2:] == [f"hc_mode={mode}", f"run_dir={tmp_path / 'out' / mode}"]


def test_default_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("num_layers: 2\n")
    cli.main(["--config", "tiny.yaml", "--dry-run"])
    assert "run_dir=runs/compare-tiny/mhc" in capsys.readouterr().out


def test_python_m_runs_the_cli(tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny.yaml").write_text("num_layers: 2\n")
    monkeypatch.setattr(sys, "argv", ["mhc-compare", "--config", str(tmp_path / "tiny.yaml"), "--dry-run"])
    runpy.run_module("mhc_megatron.compare", run_name="__main__")
    assert "hc_mode=hc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["hc_mode=mhc"], "override 'hc_mode=mhc' is not allowed: mhc-compare sets hc_mode=MODE and run_dir=OUT/MODE"),
        (["run_dir=/tmp/x"], "override 'run_dir=/tmp/x' is not allowed"),
        (["seed"], "override 'seed' must have the form key=value"),
        (["--modes", "hc,mhc"], "'hc,mhc' must include the baseline 'residual'"),
        (["--modes", "residual,mhc2"], "unknown mode(s) ['mhc2'] in 'residual,mhc2'"),
        (["--nproc-per-node", "0"], "expected an integer >= 1, got '0'"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        dry_run(tmp_path, capsys, *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_non_empty_run_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out" / "hc").mkdir(parents=True)
    (tmp_path / "out" / "hc" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit):
        dry_run(tmp_path, capsys)
    assert f"the run directory {tmp_path / 'out' / 'hc'} of mode 'hc' is not empty" in capsys.readouterr().err


FAKE_TRAIN = textwrap.dedent(
    """
    # Stands in for mhc_megatron.train: writes a run directory of synthetic steps, or fails on request.
    import json, sys
    from pathlib import Path

    assert sys.argv[1] == "--config"
    overrides = dict(argument.split("=", 1) for argument in sys.argv[3:])
    mode, run_dir = overrides["hc_mode"], Path(overrides["run_dir"])
    if overrides.get("fail_mode") == mode:
        sys.exit(3)
    run_dir.mkdir(parents=True)
    train_iters = int(overrides["train_iters"])
    (run_dir / "config.yaml").write_text(json.dumps({**overrides, "train_iters": train_iters}))
    step_time = {"residual": 0.5, "hc": 0.75, "mhc": 0.625}[mode]
    with (run_dir / "metrics.jsonl").open("w") as metrics:
        for step in range(1, train_iters + 1):
            seconds = 9.0 if step <= train_iters // 5 else step_time
            record = {"step": step, "loss": 1.0, "step_time_s": seconds, "tokens_per_s": 100 / seconds,
                      "peak_mem_bytes": 1000}
            print(json.dumps(record), file=metrics)
    """
)


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Make the CLI's runs execute FAKE_TRAIN as their training module."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(cli, "TRAIN_MODULE", "fake_train")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    config = tmp_path / "tiny.yaml"
    config.write_text("num_layers: 2\n")
    return config


def test_runs_each_mode_then_reports(tmp_path, capsys, fake_train):
    out = tmp_path / "out"
    cli.main(["--config", str(fake_train), "--out", str(out), "train_iters=10"])
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    assert "medians over the steps after the first 2 (warm-up)" in text  # train_iters // 5
    assert "| `mhc` | 10 (8) | 625.0 | 160 | +25.0 % | 0.0 | +0.0 % |" in text
    cli.main(["--config", str(fake_train), "--out", str(out), "--report-only", "--warmup-steps", "0"])
    text = (out / "report.md").read_text()
    assert "medians over the steps after the first 0 (warm-up)" in text
    assert "| `mhc` | 10 (10) | 625.0 | 160 | +25.0 % |" in text


def test_a_failing_run_stops_the_comparison(tmp_path, fake_train):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="mhc-compare: the 'hc' run failed with exit code 3"):
        cli.main(["--config", str(fake_train), "--out", str(out), "train_iters=10", "fail_mode=hc"])
    assert (out / "residual" / "metrics.jsonl").is_file() and not (out / "mhc").exists()


# The report's model-scale section (compare/scale.py): the step benchmark's files and the planner.
# The synthetic benchmark's ratios give percentages exact to one decimal: 1.5 -> +50.0 %.
BENCH_SUMMARY = {
    "residual": {"min_s": 1.0, "median_s": 1.25},
    "hc": {"vs_residual": {"ratio_of_minimums": 1.5, "per_round_ratio": {"median": 1.375, "min": 1.25, "max": 1.75}}},
    "mhc": {"vs_residual": {"ratio_of_minimums": 1.125, "per_round_ratio": {"median": 1.25, "min": 0.875, "max": 1.5}}},
}
PAPER_SETTING = ModelSpec(  # docs/planner.md's assumed 27B-class MoE of the paper
    num_layers=30, hidden_size=2560, num_attention_heads=20, num_moe_experts=72, moe_router_topk=6,
    moe_ffn_hidden_size=1536, moe_shared_expert_intermediate_size=3072, swiglu=True, vocab_size=129280,
    seq_length=4096, micro_batch_size=1, global_batch_size=1280,
)


def write_step_bench(path, summary=BENCH_SUMMARY):
    """A file shaped as ``mhc-bench step --json`` writes it, with three rounds and ``summary``."""
    path.write_text(json.dumps({
        "command": "mhc-bench step --layers 12 --hidden 768 --seq 512",
        "date": "2026-01-02T03:04:05+00:00",
        "machine": {"cpu": "Test CPU", "cores": 8, "threads": 4},
        "shape": {"layers": 12, "hidden": 768, "ffn": 3072, "seq": 512, "dtype": "float32"},
        "rounds": [{"order": ["residual", "hc", "mhc"]}] * 3,
        "summary": summary,
    }))
    return path


def planner_overheads():
    """The planner's percent overhead per variant for the report's two settings, from its own API."""
    settings = {
        "paper": (PAPER_SETTING, Layout(pp=2, ep=8, overlap=True), cluster("H800", nodes=4)),
        "gpt-1.3b": (model_from_yaml(scale.REPO / "configs/gpt-1.3b.yaml"), Layout(tp=2, pp=2),
                     cluster("H100", nodes=2)),
    }
    return {
        name: {variant: 100 * evaluate(model.with_mode(mode), replace(layout, recompute=recompute, rebuild=rebuild),
                                       machine).overhead
               for variant, (mode, recompute, rebuild) in {"hc": ("hc", "none", "sublayer"),
                                                           "mhc": ("mhc", "none", "sublayer"),
                                                           "mhc+recompute": ("mhc", "block", "sublayer"),
                                                           "mhc+recompute-block": ("mhc", "block", "block")}.items()}
        for name, (model, layout, machine) in settings.items()
    }


def test_scale_reads_the_step_benchmark(tmp_path):
    path = write_step_bench(tmp_path / "step.json")
    found = scale.overheads_at_scale([path], planner_settings=())
    assert found.planned == () and found.unavailable == ()
    (shape,) = found.measured
    assert (shape.source, shape.layers, shape.hidden, shape.seq, shape.rounds) == (str(path), 12, 768, 512, 3)
    assert (shape.dtype, shape.cpu, shape.cores, shape.threads) == ("float32", "Test CPU", 8, 4)
    assert shape.overheads == (
        scale.MeasuredOverhead("hc", of_minimums=50.0, round_median=37.5, round_min=25.0, round_max=75.0),
        scale.MeasuredOverhead("mhc", of_minimums=12.5, round_median=25.0, round_min=-12.5, round_max=50.0),
    )


def test_scale_runs_the_planner_on_its_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the settings' config paths are the repository's, not the working directory's
    found = scale.overheads_at_scale([])
    expected = planner_overheads()
    assert [plan.overheads for plan in found.planned] == [expected["paper"], expected["gpt-1.3b"]]
    assert [(plan.mfu, plan.hbm_efficiency) for plan in found.planned] == [(0.45, 0.8)] * 2


def test_the_committed_step_benchmarks_are_readable():
    found = scale.overheads_at_scale(planner_settings=())
    assert found.unavailable == ()
    assert [(shape.source, shape.layers, shape.hidden) for shape in found.measured] == [
        ("docs/bench-step-125m-after.json", 12, 768), ("docs/bench-step-350m-after.json", 24, 1024)
    ]
    assert all([cost.variant for cost in shape.overheads] == ["hc", "mhc", "mhc+recompute", "mhc+recompute-block"]
               for shape in found.measured)


def test_report_shows_the_overheads_at_model_scale(tmp_path):
    bench = write_step_bench(tmp_path / "step.json")
    text = write_report(write_runs(tmp_path / "runs"), tmp_path / "out", WARMUP, bench_files=[bench]).read_text()
    lines = text.splitlines()
    section = lines.index("## What the overhead is at model scale")
    assert lines.index("## Results") < section < lines.index("## Plots")
    assert "this comparison's shape (4 layers, hidden size 64, sequence 32)" in text
    assert "a layer's matrix products grow as C^2 per token while the connection grows as C" in text
    for line in (
        "| 12 x 768, seq 512 | `hc` | +50.0 % | +37.5 % | +25.0 to +75.0 % |",
        "| 12 x 768, seq 512 | `mhc` | +12.5 % | +25.0 % | -12.5 to +50.0 % |",
        f"- 12 x 768: `{bench}` (2026-01-02T03:04:05+00:00; Test CPU, 8 cores, 4 threads; float32; 3 rounds): "
        "`mhc-bench step --layers 12 --hidden 768 --seq 512`",
        "- `mhc-plan configs/gpt-1.3b.yaml --gpu H100 --nodes 2 --tp 2 --pp 2`",
    ):
        assert line in lines[section:]
    planned = [line for line in lines if line.startswith(("| the paper's setting", "| GPT-1.3B"))]
    assert len(planned) == 2
    for line, overheads in zip(planned, planner_overheads().values()):
        cells = " | ".join(f"{overheads[variant]:+.1f} %" for variant in scale.PLANNER_VARIANTS)
        assert line.endswith(f" | {cells} | 0.45, 0.8 |")
    assert "Left out" not in text


def test_report_names_a_missing_or_corrupt_benchmark_and_goes_on(tmp_path):
    missing = tmp_path / "missing.json"
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"summary": ')
    incomplete = write_step_bench(tmp_path / "incomplete.json", {**BENCH_SUMMARY, "mhc": {"min_s": 1.0}})
    runs = write_runs(tmp_path / "runs")
    text = write_report(runs, tmp_path / "out", WARMUP, bench_files=[missing, corrupt, incomplete]).read_text()
    lines = text.splitlines()
    assert lines.index("## Results") < lines.index("## What the overhead is at model scale")
    assert "| `mhc` | 10 (8) | 625.0 | 1,600 | +25.0 % | 1,500.0 | +50.0 % |" in text
    assert "![Peak memory per step](memory.png)" in lines
    assert "### Measured: `mhc-bench step` (CPU)" not in lines
    assert "### Predicted: `mhc-plan` (GPU clusters)" in lines
    left_out = lines[lines.index("**Left out, not available when this report was written:**") + 2:]
    assert left_out[:3] == [
        f"- `{missing}`: the file is missing",
        f"- `{corrupt}`: the file cannot be used: not valid JSON (Expecting value: line 1 column 13 (char 12))",
        f"- `{incomplete}`: the file cannot be used: it has no summary.mhc.vs_residual",
    ]


def test_a_setting_the_planner_cannot_read_is_named(tmp_path):
    setting = scale.PlannerSetting("a model", "configs/no-such-model.yaml --gpu H100")
    found = scale.overheads_at_scale([], [setting])
    assert found.planned == ()
    (missing,) = found.unavailable
    assert missing.what == "the planner's prediction for a model"
    assert "No such file or directory" in missing.reason and "configs/no-such-model.yaml" in missing.reason

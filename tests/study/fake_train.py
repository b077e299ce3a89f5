"""Stands in for ``python -m mhc_megatron.train`` in the runner's tests: writes what a 4-step run writes
(metrics.jsonl with gain profiles for HC and mHC, a checkpoint tracker every 2 steps) and ends as
``FAKE_TRAIN_ENDINGS`` says for its mode: ``hc=3,mhc=75`` makes HC diverge after step 4 and mHC stop
(exit 75) after step 2 the first time; a run whose load directory has a tracker resumes after it."""

import json
import os
import sys
from pathlib import Path

values = dict(argument.split("=", 1) for argument in sys.argv[1:] if "=" in argument)
endings = dict(item.split("=") for item in os.environ.get("FAKE_TRAIN_ENDINGS", "").split(",") if item)
run_dir, save = Path(values["run_dir"]), Path(values["save"])
tracker = save / "latest_checkpointed_iteration.txt"
first = int(tracker.read_text()) + 1 if tracker.is_file() else 1
ending = int(endings.get(values["hc_mode"], 0))
last = 2 if ending == 75 and first == 1 else 4
run_dir.mkdir(parents=True, exist_ok=True)
save.mkdir(parents=True, exist_ok=True)
with (run_dir / "metrics.jsonl").open("a") as metrics:
    for step in range(first, last + 1):
        record = {"step": step, "loss": 5.0 - step / 10 + (2.0 if step == 4 and ending == 3 else 0.0),
                  "grad_norm": float(step), "lr": float(values["lr"])}
        if step % 2 == 0:
            record["eval_loss"] = 5.0 - step / 8
            if values["hc_mode"] != "residual":
                gain = 1.0 if values["hc_mode"] == "mhc" else float(step)
                record.update(gain_forward_max=gain, gain_backward_max=gain / 2, gain_profile={
                    "forward_max": [1.0, gain], "backward_max": [1.0, gain / 2],
                    "forward_mean": [1.0, gain], "backward_mean": [1.0, gain / 2]})
        metrics.write(json.dumps(record) + "\n")
        if step % 2 == 0:
            tracker.write_text(str(step))
print(f"fake run {values['hc_mode']} seed {values['seed']}: steps {first}-{last}")
sys.exit(75 if last == 2 else ending)

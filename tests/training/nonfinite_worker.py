"""Train with NaNs injected on one rank, after the gradients were reduced, counting optimizer steps.

Usage: ``torchrun --nproc-per-node N nonfinite_worker.py --data PREFIX --run-dir RUN --report-dir DIR --fault-rank R
--nan-loss-steps 2 --nan-grad-steps 4,5,6 overrides...``. At the listed steps (1-based) rank R alone
sees a NaN in its loss or in its first gradient buffer, so only the all-reduced flag can make the
other ranks skip. Each rank writes ``DIR/rank<r>.json``: ``{"rank", "optimizer_steps", "error"}``
(the message of ``TrainingDiverged``, or ``null``).

With ``engine=deepspeed`` the NaN goes into rank R's loss at those steps (so into its gradients,
which DeepSpeed reduces), and ``optimizer_steps`` is DeepSpeed's own count of the steps it applied (``global_steps - skipped_steps``); ``--nan-grad-steps`` is for the megatron engine.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mhc_megatron.megatron import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.megatron.pipeline import step as step_module
from mhc_megatron.training import deepspeed_engine
from mhc_megatron.training.config import RunConfig
from mhc_megatron.training.exit_requests import ExitRequests
from mhc_megatron.training.loop import Trainer, TrainingDiverged


def steps(text: str) -> set[int]:
    return {int(step) for step in text.split(",") if step}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("--fault-rank", type=int, required=True)
    parser.add_argument("--nan-loss-steps", type=steps, default=set())
    parser.add_argument("--nan-grad-steps", type=steps, default=set())
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run = RunConfig.load(None, [*args.overrides, f"data_path={args.data}", f"run_dir={args.run_dir}"])
    config = run.transformer_config()
    initialize_parallel(**parallel_layout(config), seed=run.training.seed)
    trainer = Trainer(run, config)
    rank = torch.distributed.get_rank()
    forward_backward = step_module.forward_backward

    def faulty_forward_backward(model_chunks, *rest, **kwargs):
        losses = forward_backward(model_chunks, *rest, **kwargs)
        step = trainer.iteration + 1
        if rank == args.fault_rank and step in args.nan_loss_steps:
            losses[0]["lm loss"].fill_(float("nan"))
        if rank == args.fault_rank and step in args.nan_grad_steps:
            model_chunks[0].buffers[0].grad_data[0] = float("inf")
        return losses

    step_module.forward_backward = faulty_forward_backward
    gpt_loss = deepspeed_engine.gpt_loss

    def faulty_gpt_loss(model, batch):
        loss, record = gpt_loss(model, batch)
        if rank == args.fault_rank and trainer.iteration + 1 in args.nan_loss_steps:
            return loss * float("nan"), {"lm loss": record["lm loss"] * float("nan")}
        return loss, record

    deepspeed_engine.gpt_loss = faulty_gpt_loss
    optimizer_steps = 0
    optimizer_step = trainer.optimizer.step

    def counted_step(*a, **k):
        nonlocal optimizer_steps
        optimizer_steps += 1
        return optimizer_step(*a, **k)

    trainer.optimizer.step = counted_step
    error = None
    try:
        with ExitRequests(None, None, time.monotonic()) as exit_requests:
            trainer.run(exit_requests)
    except TrainingDiverged as diverged:
        error = str(diverged)
    if trainer.engine.name == "deepspeed":
        optimizer_steps = trainer.engine.engine.global_steps - trainer.engine.engine.skipped_steps
    report = {"rank": rank, "optimizer_steps": optimizer_steps, "error": error}
    (args.report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    destroy_parallel()


if __name__ == "__main__":
    main()

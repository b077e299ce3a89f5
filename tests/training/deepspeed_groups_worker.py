"""Print, as JSON, the weight-decay multiplier of every parameter of the tiny mHC model in megatron's
optimizer and in the groups handed to DeepSpeed, and the weight decay of each group of the DeepSpeed
optimizer after one schedule step.

Usage: ``python deepspeed_groups_worker.py overrides...`` (one process, gloo).
"""

import json
import sys

from mhc_megatron.world import default_to_world_of_one

default_to_world_of_one()

from mhc_megatron.megatron import destroy_parallel, initialize_parallel, parallel_layout  # noqa: E402
from mhc_megatron.megatron.pipeline.step import wrap_with_ddp  # noqa: E402
from mhc_megatron.training.builders import build_model, build_training_optimizer  # noqa: E402
from mhc_megatron.training.config import RunConfig  # noqa: E402
from mhc_megatron.training.deepspeed_engine import DeepSpeedEngine, optimizer_param_groups  # noqa: E402


def wd_mults(named_parameters, groups) -> dict[str, float]:
    mult_of = {id(param): group["wd_mult"] for group in groups for param in group["params"]}
    return {name: mult_of[id(param)] for name, param in named_parameters}


def main():
    run = RunConfig.load(None, sys.argv[1:])
    config = run.transformer_config()
    initialize_parallel(**parallel_layout(config), seed=run.training.seed)
    chunks = build_model(run, config, vocab_size=256)
    names = list(chunks[0].named_parameters())
    ours = wd_mults(names, optimizer_param_groups(chunks, run))
    megatron_optimizer = build_training_optimizer(run, config, wrap_with_ddp(chunks, config))
    megatron = wd_mults(names, megatron_optimizer.param_groups)
    engine = DeepSpeedEngine(run, config, build_model(run, config, vocab_size=256), data_parallel=1)
    engine.scheduler.step(1)
    deepspeed = [(group["wd_mult"], group["weight_decay"]) for group in engine.optimizer.param_groups]
    print(json.dumps({"ours": ours, "megatron": megatron, "deepspeed_groups": deepspeed}))
    destroy_parallel()


if __name__ == "__main__":
    main()

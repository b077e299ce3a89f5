"""The ``mhc-train`` job: configuration (``config``, ``arguments``), what a run is built of
(``builders``), the loop (``loop``),
checkpoints with exact resume (``checkpoints``), metrics (``metrics``) and the pipeline-wide Amax
gain (``amax``). The entry point is ``mhc_megatron.train``."""

from mhc_megatron.training.arguments import TrainingArguments
from mhc_megatron.training.config import RunConfig
from mhc_megatron.training.loop import Trainer, TrainResult, evaluate, train

__all__ = ["RunConfig", "TrainResult", "Trainer", "TrainingArguments", "evaluate", "train"]

"""The training job's own settings (everything that is not part of the model's config).

Names follow Megatron-LM's command-line arguments where one exists (``train_iters``,
``global_batch_size``, ``lr_warmup_iters``, ``save_interval``, ``finetune``, ...), so a Megatron user
reads a config without a glossary.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mhc_megatron.training.exit_requests import signal_number
from mhc_megatron.training.wandb_run import check_wandb_installed

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = (1, 2, 3)


@dataclass
class TrainingArguments:
    """Settings of one training run.

    Steps, batches and data:
        train_iters: optimizer steps of the whole run (the LR schedule spans them).
        exit_interval: stop (after saving, when ``save`` is set) once this step is reached; the
            schedule still spans ``train_iters``, so a later run with ``load`` continues exactly.
        exit_signal: on this signal (a name; ``null``: none is caught) every rank finishes its step,
            the run saves (when ``save`` is set) and exits with status 75, to be resumed with
            ``load``. exit_duration_in_mins: the same once the run has lasted this long.
        distributed_timeout_minutes: how long a collective waits for a rank that does not come (a
            node that died silently) before the job fails; a rank that dies on a live node is noticed
            at once. Megatron-LM's default.
        max_consecutive_skips: a step whose loss or gradients are non-finite on any rank is skipped
            (no update, the LR schedule does not advance); after this many in a row the run stops.
        micro_batch_size / global_batch_size: sequences per micro-batch / per optimizer step
            (over all data-parallel ranks); the ratio over data-parallel size is the number of
            micro-batches of the pipeline schedule.
        seq_length: tokens per sequence. max_position_embeddings: defaults to ``seq_length``.
        data_path: prefix of an indexed dataset (``PREFIX.bin``/``PREFIX.idx``, see
            ``mhc-preprocess``); unset: the default corpus, built once under ``data_dir``.
        split: megatron's ``"train,valid,test"`` document weights.
        tokenizer: ``byte-level`` or the path of a local HuggingFace tokenizer directory.
        seed: the initial weights (the same model under every parallel layout), the datasets'
            sample order and the dropout masks.
    Optimizer and schedule (megatron-core's Adam and ``OptimizerParamScheduler``):
        lr, min_lr, lr_warmup_iters, lr_decay_iters (default ``train_iters``), lr_decay_style,
        weight_decay, adam_beta1, adam_beta2, adam_eps, clip_grad, use_distributed_optimizer.
    Engine:
        engine: ``megatron`` (megatron-core's DDP, optimizer and pipeline schedules) or ``deepspeed``
            (the same model, TP = PP = 1, trained by ``deepspeed.initialize`` with ZeRO; the
            ``deepspeed`` extra; ``deepspeed_engine.py``). zero_stage: DeepSpeed's ZeRO stage, 1, 2
            or 3 (``engine=deepspeed`` only; default 1).
    Evaluation, logging, checkpoints:
        eval_interval (0: never), eval_iters: validation batches per evaluation (the same ones each
        time, so evaluations compare). log_interval: steps between console lines and Amax-gain
        measurements (metrics.jsonl gets every step). save: checkpoint directory; save_interval
        (0: only at the end). load: checkpoint directory to resume from (its latest iteration);
        finetune: load only the weights and start at step 0 with a fresh optimizer.
        gain_profile_interval (0: never): every this many steps, and after steps 1 and
            ``train_iters``, HC and mHC runs forward a fixed probe batch (the first micro-batch of the
            first validation batch; the first training batch without validation data) and log the
            Amax gains of the composite stream mixing at every depth, max and mean over its tokens
            (``gain_profile`` in metrics.jsonl; ``modules/diagnostics.py`` defines them).
        run_dir: where config.yaml, metrics.jsonl and tensorboard/ go. wandb / wandb_project:
        also log to Weights & Biases (the ``wandb`` extra; offline without an API key, see
        ``wandb_run.py``).
    Model building (``GPTModel`` arguments; the transformer's own fields are the model keys):
        position_embedding_type, untie_embeddings_and_output_weights,
        swiglu (gated SiLU MLP), make_vocab_size_divisible_by (vocabulary padding, times TP).
    """

    train_iters: int = 100
    exit_interval: int | None = None
    exit_signal: str | None = "SIGTERM"
    exit_duration_in_mins: float | None = None
    max_consecutive_skips: int = 3
    distributed_timeout_minutes: float = 10.0
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    max_position_embeddings: int | None = None
    seed: int = 1234
    data_path: str | None = None
    data_dir: str = "runs/data"
    split: str = "98,2,0"
    tokenizer: str = "byte-level"
    lr: float = 3.0e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    eval_interval: int = 0
    eval_iters: int = 2
    log_interval: int = 10
    gain_profile_interval: int = 0
    save: str | None = None
    save_interval: int = 0
    load: str | None = None
    finetune: bool = False
    run_dir: str = "runs/run"
    wandb: bool = False
    wandb_project: str = "mhc-megatron"
    position_embedding_type: str = "rope"
    untie_embeddings_and_output_weights: bool = False
    swiglu: bool = False
    make_vocab_size_divisible_by: int = 128
    engine: str = "megatron"
    zero_stage: int | None = None

    def __post_init__(self) -> None:
        for name in ("train_iters", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                     "eval_iters", "make_vocab_size_divisible_by"):
            _require_int(name, getattr(self, name), minimum=1 if name != "train_iters" else 0)
        for name in ("lr_warmup_iters", "eval_interval", "save_interval", "gain_profile_interval"):
            _require_int(name, getattr(self, name), minimum=0)
        _require_int("max_consecutive_skips", self.max_consecutive_skips, minimum=1)
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ValueError(f"exit_duration_in_mins must be > 0 or null, got {self.exit_duration_in_mins!r}")
        if not self.distributed_timeout_minutes > 0:
            raise ValueError(f"distributed_timeout_minutes must be > 0, got {self.distributed_timeout_minutes!r}")
        if self.exit_signal is not None:
            signal_number(self.exit_signal)
        for name in ("exit_interval", "lr_decay_iters", "max_position_embeddings"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        for name, allowed in (
            ("lr_decay_style", LR_DECAY_STYLES),
            ("position_embedding_type", POSITION_EMBEDDINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                f"{self.micro_batch_size}"
            )
        if self.lr_warmup_iters and self.lr_warmup_iters >= self.decay_iters:
            raise ValueError(
                f"lr_warmup_iters {self.lr_warmup_iters} must be less than lr_decay_iters {self.decay_iters} "
                "(which defaults to train_iters): set lr_warmup_iters below it, or lr_decay_iters above it"
            )
        if self.finetune and not self.load:
            raise ValueError("finetune=true loads weights from 'load', but load is not set")
        if self.wandb:
            check_wandb_installed()
        self._check_engine()

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {self.engine!r}")
        if self.engine == "megatron":
            if self.zero_stage is not None:
                raise ValueError(
                    f"zero_stage={self.zero_stage} applies to engine=deepspeed; with engine=megatron shard the "
                    "optimizer state with use_distributed_optimizer=true, or set engine=deepspeed"
                )
            return
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {', '.join(map(str, ZERO_STAGES))}, got {self.zero_stage!r}")
        if self.use_distributed_optimizer:
            raise ValueError(
                "use_distributed_optimizer=true is megatron's sharded optimizer; with engine=deepspeed ZeRO "
                "shards it: set use_distributed_optimizer=false and choose zero_stage"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("engine=deepspeed needs the deepspeed package, which is not installed: "
                             "pip install -e '.[deepspeed]' (make test installs it), or set engine=megatron")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def deepspeed_zero_stage(self) -> int:
        """The ZeRO stage of an ``engine=deepspeed`` run (``zero_stage``, default 1)."""
        return 1 if self.zero_stage is None else self.zero_stage

    @property
    def last_step(self) -> int:
        """The step this run stops after: ``train_iters``, or ``exit_interval`` when it is earlier."""
        return min(self.train_iters, self.exit_interval or self.train_iters)


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

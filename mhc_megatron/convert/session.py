"""What both conversions share: one process with megatron's groups, models built from a run config at
TP = PP = 1 (a distributed checkpoint loads under any layout, so the converted one trains under the
user's), the weights a checkpoint holds loaded into every non-hyper-connection parameter, a probe
of the logits, and the converted checkpoint saved with a config to train it from.

Memory: the source and the converted model are held at once, whole, in this process (twice the
model's weights; a model that does not fit twice in host memory cannot be converted this way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.utils import unwrap_model

from mhc_megatron.megatron import destroy_parallel, initialize_parallel, parallel_layout
from mhc_megatron.megatron.model.checkpointing import check_saved_tensors, read_checkpoint_metadata
from mhc_megatron.modules import HyperConnection, StreamCollapse
from mhc_megatron.training.builders import build_model
from mhc_megatron.training.checkpoint_files import has_checkpoints, resolve_checkpoint
from mhc_megatron.training.checkpoints import save_training_checkpoint
from mhc_megatron.training.config import RunConfig
from mhc_megatron.world import default_to_world_of_one

# The layout every converter builds its models in.
SINGLE_PROCESS_LAYOUT = (
    "tensor_model_parallel_size=1", "pipeline_model_parallel_size=1", "virtual_pipeline_model_parallel_size=null",
    "expert_model_parallel_size=1", "sequence_parallel=false",
)
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
PROBE_BATCH, PROBE_TOKENS = 2, 64


@dataclass(frozen=True)
class SourceCheckpoint:
    """A distributed checkpoint to convert: its directory, its tensors' metadata and common state."""

    directory: Path
    tensors: dict
    common: dict

    @classmethod
    def open(cls, load: str | Path) -> SourceCheckpoint:
        """The checkpoint ``load`` stands for (a save directory's latest iteration, or one iteration)."""
        directory = resolve_checkpoint(load)
        common, tensors = read_checkpoint_metadata(directory)
        return cls(directory, tensors, common)

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary size the model was built with (padded for its tensor-parallel size)."""
        if WORD_EMBEDDINGS not in self.tensors:
            raise ValueError(f"checkpoint {str(self.directory)!r} has no tensor {WORD_EMBEDDINGS!r}: not a GPT checkpoint")
        return int(self.tensors[WORD_EMBEDDINGS].global_shape[0])

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The whole (unsharded) tensors ``keys``, as saved."""
        for key in keys:
            if key not in self.tensors:
                raise ValueError(f"checkpoint {str(self.directory)!r} has no tensor {key!r}")
        request = {
            key: ShardedTensor.from_rank_offsets(
                key, torch.empty(tuple(self.tensors[key].global_shape), dtype=self.tensors[key].dtype), replica_id=0
            )
            for key in keys
        }
        return dist_checkpointing.load(request, str(self.directory))


def single_process_run(config: str | Path | None, overrides: list[str]) -> RunConfig:
    """The run config of ``config`` with ``overrides``, in the converters' TP = PP = 1 layout."""
    return RunConfig.load(config, [*overrides, *SINGLE_PROCESS_LAYOUT])


@contextlib.contextmanager
def megatron_process(run: RunConfig) -> Iterator[None]:
    """This process as a world of one, with megatron's groups for ``run``'s (single-process) layout."""
    default_to_world_of_one()
    initialize_parallel(**parallel_layout(run.transformer_config()), seed=run.training.seed)
    try:
        yield
    finally:
        destroy_parallel()


def build_single_model(run: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The GPT of ``run`` (built at TP = PP = 1, its seed's initial weights), unwrapped."""
    [chunk] = build_model(run, run.transformer_config(), vocab_size)
    return unwrap_model(chunk)


def hyper_connection_parameters(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the model's hyper-connection and stream-collapse parameters."""
    return {
        f"{name}.{parameter}"
        for name, module in model.named_modules()
        if isinstance(module, (HyperConnection, StreamCollapse))
        for parameter, _ in module.named_parameters(recurse=False)
    }


def load_all_but(model: torch.nn.Module, source: SourceCheckpoint, skipped: set[str]) -> None:
    """Load every entry of ``model``'s state but ``skipped`` from ``source``, checking each tensor's
    presence and global shape first (an error names the tensor; nothing is loaded then)."""
    wanted = {key: value for key, value in model.sharded_state_dict().items() if key not in skipped}
    check_saved_tensors((v for v in wanted.values() if isinstance(v, ShardedTensor)), source.tensors, source.directory)
    loaded = dist_checkpointing.load(wanted, str(source.directory))  # and the checkpoint's common state
    _load_all_but_state(model, {key: loaded[key] for key in wanted}, skipped, source.directory)


def copy_all_but(model: torch.nn.Module, source_model: torch.nn.Module, skipped: set[str]) -> None:
    """Copy every entry of ``model``'s state but ``skipped`` from ``source_model`` (already loaded),
    which must have all of them, with the same shapes, and nothing else."""
    _load_all_but_state(model, source_model.state_dict(), skipped, "the source model")


def _load_all_but_state(model: torch.nn.Module, state: dict, skipped: set[str], source) -> None:
    """``model.load_state_dict(state)`` where exactly ``skipped`` may be missing from ``state``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = set(missing) - skipped
    if left or unexpected:
        raise RuntimeError(f"loading {source} left {sorted(left)} unloaded and {sorted(unexpected)} unused")


def probe_logits(model: torch.nn.Module, vocab_size: int, seq_length: int) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of ``model`` (eval mode, no autograd) on a fixed batch of random tokens,
    ``s`` = ``seq_length`` (the run's, which fits its positions) or ``PROBE_TOKENS`` if shorter."""
    generator = torch.Generator().manual_seed(0)
    length = min(seq_length, PROBE_TOKENS)
    tokens = torch.randint(vocab_size, (PROBE_BATCH, length), generator=generator)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return model(tokens.to(device), torch.arange(length, device=device).expand_as(tokens), None).float().cpu()


@dataclass(frozen=True)
class LogitDifference:
    """How far two models' probe logits are apart: the max absolute difference, and that over the
    largest absolute logit."""

    max_abs: float
    relative: float

    @classmethod
    def between(cls, logits: torch.Tensor, reference: torch.Tensor) -> LogitDifference:
        max_abs = (logits - reference).abs().max().item()
        return cls(max_abs, max_abs / max(reference.abs().max().item(), torch.finfo(torch.float32).tiny))

    def __str__(self) -> str:
        return f"max |difference| {self.max_abs:.3e} ({self.relative:.3e} of the largest logit)"


def check_output_directory(output: str | Path) -> Path:
    """``output`` as a new save directory; an error if it already holds checkpoints."""
    output = Path(output)
    if has_checkpoints(output):
        raise ValueError(f"output {str(output)!r} already holds checkpoints; choose a new directory (nothing was written)")
    return output


def save_converted(output: Path, model: torch.nn.Module, target: RunConfig, user_target: RunConfig,
                   provenance: dict) -> Path:
    """Save ``model`` (built from ``target``) as iteration 0 of the save directory ``output``, with
    ``output/config.yaml``: ``user_target`` (the user's layout) loading these weights
    (``load=output``, ``finetune=true``, ``run_dir=output/run``, no ``save``: the user names one).
    Returns the checkpoint directory."""
    directory = save_training_checkpoint(output, 0, [model], None, target.transformer_config(),
                                         {"iteration": 0, "converted_from": provenance})
    mapping = {**user_target.to_mapping(), "load": str(output), "finetune": True, "save": None,
               "run_dir": str(output / "run")}
    RunConfig.from_mapping(mapping).to_yaml(output / "config.yaml")
    return directory

"""Stability diagnostics of the stream mixing: the Amax gain magnitude and per-layer H_res statistics.

The composite mapping of a token through layers ``1..L`` is ``P = H_res(L) ... H_res(1)`` (each
``H_res`` multiplies the streams from the left). mHC's Amax gain magnitude (paper, fig. 3 and 7):

    forward gain  = max_i sum_j |P[i, j]|     (max absolute row sum: how much a stream can grow)
    backward gain = max_j sum_i |P[i, j]|     (max absolute column sum: the same for gradients)

each averaged over tokens. A doubly stochastic ``P`` has both gains equal to 1.

Recording is off by default and costs nothing then. Inside ``record_mappings(model)`` every
hyper-connection of ``model`` hands its detached ``h_res`` ([..., n, n], n*n floats per token) to a
recorder, in call order::

    with record_mappings(model) as recorder:
        model(tokens)
    gain = recorder.amax_gain()            # AmaxGain(forward=..., backward=...)
    table = recorder.layer_statistics()    # one HResStatistics per sub-layer
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mhc_megatron.modules.hyper_connection import HyperConnection
from mhc_megatron.ops.checks import check_floating, check_min_rank


@dataclass(frozen=True)
class AmaxGain:
    forward: float
    backward: float


@dataclass(frozen=True)
class HResStatistics:
    """Summary of one sub-layer's ``h_res`` over the tokens of a forward pass."""

    layer_index: int
    forward_gain: float  # mean over tokens of the max absolute row sum
    backward_gain: float  # mean over tokens of the max absolute column sum
    max_row_sum_error: float  # max over tokens and rows of |row sum - 1|
    max_col_sum_error: float  # max over tokens and columns of |column sum - 1|
    min_entry: float
    mean_diagonal: float  # mean weight a stream keeps of itself


def _check_matrices(h_res: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(h_res) == 0:
        raise ValueError("h_res must hold at least one [..., n, n] matrix, got an empty sequence")
    matrices = []
    for index, matrix in enumerate(h_res):
        name = f"h_res[{index}]"
        check_floating(name, matrix)
        check_min_rank(name, matrix, 2, "[..., n, n]")
        if matrix.shape != h_res[0].shape or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                f"{name} must have the square shape of h_res[0] {tuple(h_res[0].shape)}, "
                f"got {tuple(matrix.shape)}"
            )
        matrices.append(matrix.detach().to(torch.float64))
    return matrices


def _gains(matrix: torch.Tensor) -> AmaxGain:
    magnitude = matrix.abs()
    return AmaxGain(
        forward=magnitude.sum(dim=-1).amax(dim=-1).mean().item(),
        backward=magnitude.sum(dim=-2).amax(dim=-1).mean().item(),
    )


def composite_mapping(h_res: Sequence[torch.Tensor]) -> torch.Tensor:
    """``H_res(L) @ ... @ H_res(1)`` in float64, for layers given in forward order ``[1, ..., L]``."""
    matrices = _check_matrices(h_res)
    product = matrices[0]
    for matrix in matrices[1:]:
        product = matrix @ product
    return product


def amax_gain(h_res: Sequence[torch.Tensor]) -> AmaxGain:
    """Amax gain magnitudes of the composite mapping of ``h_res`` (forward order), token-averaged."""
    return _gains(composite_mapping(h_res))


def hres_statistics(h_res: torch.Tensor, layer_index: int = 0) -> HResStatistics:
    """Statistics of one sub-layer's ``h_res`` ``[..., n, n]`` over its tokens."""
    (matrix,) = _check_matrices([h_res])
    gains = _gains(matrix)
    return HResStatistics(
        layer_index=layer_index,
        forward_gain=gains.forward,
        backward_gain=gains.backward,
        max_row_sum_error=(matrix.sum(dim=-1) - 1).abs().max().item(),
        max_col_sum_error=(matrix.sum(dim=-2) - 1).abs().max().item(),
        min_entry=matrix.min().item(),
        mean_diagonal=matrix.diagonal(dim1=-2, dim2=-1).mean().item(),
    )


class MappingRecorder:
    """Collects the ``h_res`` of hyper-connections in the order they run."""

    def __init__(self) -> None:
        self.h_res: list[torch.Tensor] = []
        self.layer_indices: list[int] = []

    def __call__(self, module: HyperConnection, h_res: torch.Tensor) -> None:
        self.h_res.append(h_res)
        self.layer_indices.append(module.layer_index)

    def amax_gain(self) -> AmaxGain:
        return amax_gain(self.h_res)

    def layer_statistics(self) -> list[HResStatistics]:
        return [hres_statistics(m, i) for m, i in zip(self.h_res, self.layer_indices)]


@contextlib.contextmanager
def record_mappings(model: nn.Module) -> Iterator[MappingRecorder]:
    """Record the ``h_res`` of every ``hc``/``mhc`` hyper-connection in ``model`` while inside."""
    recorder = MappingRecorder()
    connections = [m for m in model.modules() if isinstance(m, HyperConnection)]
    for connection in connections:
        connection.mapping_observer = recorder
    try:
        yield recorder
    finally:
        for connection in connections:
            connection.mapping_observer = None

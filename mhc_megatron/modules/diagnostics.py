"""Stability diagnostics of the stream mixing: the Amax gain magnitude and per-layer H_res statistics.

The composite mapping of a token through sub-layers ``1..l`` is ``P_l = H_res(l) ... H_res(1)``
(each ``H_res`` multiplies the streams from the left: ``out[i] = sum_j H_res[i, j] x[j]``, stream i
is row i). mHC's Amax gain magnitude (paper, fig. 3 and 7) of one token's ``P``:

    forward gain  = max_i sum_j |P[i, j]|     (max absolute row sum: how much a stream can grow)
    backward gain = max_j sum_i |P[i, j]|     (max absolute column sum: the same for gradients)

The forward gain bounds ``max_i |(P x)_i|`` over inputs with ``max_j |x_j| <= 1`` and is reached by
``x_j = sign(P[i*, j])``; the gradient reaching stream ``j`` is ``sum_i P[i, j] g_i``, hence columns
for the backward gain. (Applying ``H_res`` transposed swaps the two: a slip some implementations
made.) A doubly stochastic ``P`` has both gains equal to 1. ``token_gains`` computes them per token;
the reductions over tokens are the mean (``amax_gain``, logged during training) and, with the mean,
the max (``gain_profile``: one value per depth ``l``, the stability study's measure).

Recording is off by default and costs nothing then. Inside ``record_mappings(model)`` every
hyper-connection of ``model`` hands its detached ``h_res`` ([..., n, n], n*n floats per token) to a
recorder, in call order::

    with record_mappings(model) as recorder:
        model(tokens)
    gain = recorder.amax_gain()            # AmaxGain(forward=..., backward=...), token means
    profile = gain_profile(recorder.h_res) # GainProfile: per depth, max and mean over tokens
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


def token_gains(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward, backward)`` gains of each matrix of ``matrix [..., n, n]``, each ``[...]``: the
    max absolute row sum and the max absolute column sum."""
    magnitude = matrix.abs()
    return magnitude.sum(dim=-1).amax(dim=-1), magnitude.sum(dim=-2).amax(dim=-1)


def _gains(matrix: torch.Tensor) -> AmaxGain:
    forward, backward = token_gains(matrix)
    return AmaxGain(forward=forward.mean().item(), backward=backward.mean().item())


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


@dataclass(frozen=True)
class GainProfile:
    """Amax gains of the composite mappings ``P_1, ..., P_L`` (index ``l - 1`` holds depth ``l``:
    the product of the first ``l`` sub-layers' ``H_res``), reduced over the tokens: ``*_max`` is the
    largest token's gain, ``*_mean`` the mean over tokens. The whole model's gain is the last entry."""

    forward_max: list[float]
    backward_max: list[float]
    forward_mean: list[float]
    backward_mean: list[float]

    def to_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in vars(self).items()}


def gain_profile(h_res: Sequence[torch.Tensor]) -> GainProfile:
    """The ``GainProfile`` of ``h_res`` (forward order, each ``[..., n, n]`` over the same tokens),
    computed in float64."""
    matrices = _check_matrices(h_res)
    columns: dict[str, list[float]] = {name: [] for name in ("forward_max", "backward_max", "forward_mean", "backward_mean")}
    product = None
    for matrix in matrices:
        product = matrix if product is None else matrix @ product
        forward, backward = token_gains(product)
        columns["forward_max"].append(forward.max().item())
        columns["backward_max"].append(backward.max().item())
        columns["forward_mean"].append(forward.mean().item())
        columns["backward_mean"].append(backward.mean().item())
    return GainProfile(**columns)


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

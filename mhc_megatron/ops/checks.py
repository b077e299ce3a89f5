"""Argument checks shared by the mHC operators.

Every public operator validates its arguments up front, so that a wrong shape or dtype fails with a
message naming the argument, what it got and what was expected, instead of broadcasting silently
or failing deep inside a matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), "
            f"got {tensor.dtype}"
        )
    return tensor


def check_min_rank(name: str, tensor: torch.Tensor, min_rank: int, layout: str) -> None:
    if tensor.dim() < min_rank:
        raise ValueError(
            f"{name} must have at least {min_rank} dimensions {layout}, "
            f"got shape {tuple(tensor.shape)}"
        )


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    """Require an exact shape: no broadcasting of leading or trailing dimensions."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} {layout}, got {tuple(tensor.shape)}"
        )


def check_num_streams(name: str, n: int) -> None:
    if n < 1:
        raise ValueError(f"the number of streams n (from {name}) must be >= 1, got {n}")


def check_int(name: str, value: object, minimum: int) -> int:
    """An ``int`` (not ``bool``) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the coefficient math: float64 for float64 data, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32

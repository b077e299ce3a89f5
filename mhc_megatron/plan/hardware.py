"""Devices and clusters: a small table of known GPUs and the cluster description the planner reads.

Units: FLOP/s, bytes/s and bytes (plain SI, 1 GB = 1e9 bytes). Link bandwidths are per GPU and per
direction (NVLink's "900 GB/s" of bidirectional aggregate is 450 GB/s each way; one 400 Gb/s
InfiniBand NIC per GPU is 50 GB/s). The table holds vendor datasheet figures (dense bf16 tensor-core
peak without sparsity, HBM bandwidth and capacity, the NVLink generation of the 8-GPU HGX board and
the usual InfiniBand NIC of that generation's reference cluster); ``ClusterSpec`` takes overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: bf16 dense peak (FLOP/s), HBM bandwidth (bytes/s) and capacity (bytes), and
    the default intra-node (NVLink) and inter-node (InfiniBand) bandwidth per GPU and direction."""

    name: str
    bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float


KNOWN_GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        # NVLink 4 (900 GB/s aggregate), ConnectX-7 NDR 400 Gb/s per GPU.
        GpuSpec("H100-SXM", 989 * TFLOPS, 3350 * GB, 80 * GB, 450 * GB, 50 * GB),
        # The export variant DeepSeek trained on: H100 compute and HBM, NVLink cut to 400 GB/s aggregate.
        GpuSpec("H800-SXM", 989 * TFLOPS, 3350 * GB, 80 * GB, 200 * GB, 50 * GB),
        GpuSpec("H200-SXM", 989 * TFLOPS, 4800 * GB, 141 * GB, 450 * GB, 50 * GB),
        # NVLink 3 (600 GB/s aggregate), HDR 200 Gb/s per GPU.
        GpuSpec("A100-80GB-SXM", 312 * TFLOPS, 2039 * GB, 80 * GB, 300 * GB, 25 * GB),
        # HGX B200: NVLink 5 (1.8 TB/s aggregate), 180 GB usable HBM3e, NDR 400 Gb/s per GPU.
        GpuSpec("B200", 2250 * TFLOPS, 8000 * GB, 180 * GB, 900 * GB, 50 * GB),
    )
}

_ALIASES = {"H100": "H100-SXM", "H800": "H800-SXM", "H200": "H200-SXM", "A100": "A100-80GB-SXM"}


def gpu(name: str) -> GpuSpec:
    """The table entry for ``name`` (case-insensitive; "H100", "H200", "A100" name the SXM parts)."""
    by_upper = {key.upper(): spec for key, spec in KNOWN_GPUS.items()}
    key = _ALIASES.get(name.upper(), name).upper()
    if key not in by_upper:
        known = ", ".join(list(KNOWN_GPUS) + list(_ALIASES))
        raise ValueError(f"unknown GPU {name!r}: expected one of {known} (or give every device field as an override)")
    return by_upper[key]


@dataclass(frozen=True)
class ClusterSpec:
    """The machines a job runs on.

    ``link_latency`` (s) is added to every point-to-point transfer; ``mfu`` is the share of the bf16
    peak that the layers' matrix products reach and ``hbm_efficiency`` the share of HBM bandwidth that
    memory-bound kernels reach (both assumptions, not device facts).
    """

    device: GpuSpec
    gpus_per_node: int = 8
    nodes: int = 1
    link_latency: float = 10e-6
    mfu: float = 0.45
    hbm_efficiency: float = 0.8

    def __post_init__(self) -> None:
        for name in ("bf16_flops", "hbm_bandwidth", "hbm_bytes", "intra_node_bandwidth", "inter_node_bandwidth"):
            _positive(f"device {name}", getattr(self.device, name))
        for name in ("gpus_per_node", "nodes", "mfu", "hbm_efficiency"):
            _positive(name, getattr(self, name))
        if self.link_latency < 0:
            raise ValueError(f"link_latency must be >= 0 s, got {self.link_latency}")
        if self.mfu > 1 or self.hbm_efficiency > 1:
            raise ValueError(f"mfu and hbm_efficiency are shares of the peak, expected <= 1, got {self.mfu}, {self.hbm_efficiency}")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def gemm_flops(self) -> float:
        """FLOP/s the matrix products reach (peak x mfu)."""
        return self.device.bf16_flops * self.mfu

    @property
    def memory_bandwidth(self) -> float:
        """Bytes/s the memory-bound kernels reach (HBM bandwidth x hbm_efficiency)."""
        return self.device.hbm_bandwidth * self.hbm_efficiency


def cluster(gpu_name: str, **overrides) -> ClusterSpec:
    """A ``ClusterSpec`` for ``gpu_name`` from the table; keyword overrides replace device fields
    (``bf16_flops``, ``hbm_bandwidth``, ``hbm_bytes``, ``intra_node_bandwidth``,
    ``inter_node_bandwidth``) or cluster fields (``gpus_per_node``, ``nodes``, ``link_latency``,
    ``mfu``, ``hbm_efficiency``). ``None`` values are ignored."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    device_fields = {key: overrides.pop(key) for key in list(overrides) if key in GpuSpec.__dataclass_fields__}
    unknown = set(overrides) - set(ClusterSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown cluster fields {sorted(unknown)}")
    return ClusterSpec(device=replace(gpu(gpu_name), **device_fields), **overrides)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")

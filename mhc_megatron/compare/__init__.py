"""Compare the hyper-connection modes: train one config as ``residual``, ``hc`` and ``mhc``, then report.

``report`` reads run directories (``config.yaml``, ``metrics.jsonl``), summarizes them and writes
``report.md`` with its plots; ``cli`` is the ``mhc-compare`` command that runs the trainings first.
"""

from mhc_megatron.compare.report import (
    BASELINE,
    Overhead,
    RunSummary,
    load_config,
    load_metrics,
    overheads,
    summarize,
    write_report,
)

__all__ = [
    "BASELINE",
    "Overhead",
    "RunSummary",
    "load_config",
    "load_metrics",
    "overheads",
    "summarize",
    "write_report",
]

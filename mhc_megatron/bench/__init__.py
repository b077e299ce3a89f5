"""Benchmarks behind the ``mhc-bench`` command (``mhc-bench kernels ...``)."""

"""mhc_megatron: manifold-constrained hyper-connections (mHC) for megatron-core.

Packages: ``ops`` (functional reference operators), ``modules`` (hyper-connection and stream
modules), ``diagnostics`` (Amax gain and H_res statistics), ``megatron`` (the megatron-core
integration). Importing this package imports neither megatron-core nor anything that touches a
GPU; ``mhc_megatron.megatron`` imports megatron-core.
"""

__version__ = "0.1.0"

"""mhc_megatron: manifold-constrained hyper-connections (mHC) for megatron-core.

Packages: ``ops`` (functional reference operators), ``modules`` (hyper-connection and stream
modules), ``diagnostics`` (Amax gain and H_res statistics). Importing this package does not import
megatron-core and never touches a GPU.
"""

__version__ = "0.1.0"

"""Functional mHC operators: the reference implementation of the method, in plain PyTorch.

Conventions (stated here once; every other module, kernel and doc follows them):

* Streams of a token are an ``n x C`` matrix, stream ``i`` is row ``i``. Operators take them as
  ``[..., n, C]``; the model stores them as ``[s, b, n*C]`` (stream 0 first), the same memory.
* ``h_res`` multiplies the streams from the left: ``out[i] = sum_j h_res[i, j] * x[j]``. Row ``i``
  of ``h_res`` produces output stream ``i``.
* Sinkhorn-Knopp starts from ``exp(logits - max)`` (one max per matrix) and normalises columns,
  then rows, in each iteration: rows sum to 1 exactly, columns approximately.
* The RMS norm of the mappings is ``sqrt(mean(v^2) + eps)``, eps inside the root, over all ``n*C``
  values of the token, applied after the projection (``m / r``).
* Coefficients (``h_pre``, ``h_post``, ``h_res``) are computed in float32 whatever the dtype of the
  streams (float64 for float64 streams); stream outputs keep the dtype of the streams.

``mhc_mappings_pre`` is ``mhc_mappings`` followed by ``mhc_pre`` in one op (for the fused kernels).
``hc_mappings_pre`` is the same for the HC baseline's mappings (tanh, unconstrained; its module
docstring states them). ``mhc_post_res_mappings_pre`` is ``mhc_post_res`` followed by the next
sub-layer's ``mhc_mappings_pre`` on its output, in one op (the stream state between two sub-layers).

All seven operators are differentiable in every tensor argument and validate their arguments.
"""

from mhc_megatron.ops.hc_mappings_pre import hc_mappings_pre
from mhc_megatron.ops.mappings import mhc_mappings, num_mapping_columns, rms_projection
from mhc_megatron.ops.mappings_pre import mhc_mappings_pre
from mhc_megatron.ops.post_res import mhc_post_res
from mhc_megatron.ops.post_res_mappings_pre import mhc_post_res_mappings_pre
from mhc_megatron.ops.pre import mhc_pre
from mhc_megatron.ops.sinkhorn import sinkhorn

__all__ = ["hc_mappings_pre", "mhc_mappings", "mhc_mappings_pre", "mhc_post_res", "mhc_post_res_mappings_pre",
           "mhc_pre", "num_mapping_columns", "rms_projection", "sinkhorn"]

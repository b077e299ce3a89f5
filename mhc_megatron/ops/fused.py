"""The fused C++/CUDA operators (``torch.ops.mhc_megatron.*``) with autograd and fake tensors.

The extension ``mhc_megatron._C`` (built from ``kernels/`` by setup.py, see kernels/extension.py)
defines the ops ``{sinkhorn, mappings, mappings_pre, pre, post_res, hc_mappings_pre,
post_res_mappings_pre}_{fwd, bwd}`` and their CPU and CUDA kernels (``CPU_ONLY_OPS`` have CPU kernels
only: on CUDA tensors the reference runs, see ``unavailable_reason``; post_res_mappings_pre has no
CUDA kernel either, and runs there as the CUDA kernels of post_res and mappings_pre, one after the
other). This module registers, when the extension is present:

* fake (meta) implementations, so ``torch.compile`` traces the ops without a graph break;
* autograd: each ``*_fwd`` op is differentiated by its ``*_bwd`` op.

The CPU kernels exist once per instruction-set level (``CPU_ISA_LEVELS``: ``scalar``, the
portable baseline; ``avx2``, with FMA; ``avx512``); the extension picks one when a CPU op first
runs: ``MHC_CPU_ISA`` if set, else the highest this CPU runs. ``cpu_isa``, ``set_cpu_isa`` and
``use_cpu_isa`` read and change it, ``cpu_isa_levels`` lists the levels this CPU runs.

The functions below take arguments already validated by the public operators and return what the
reference returns (same shapes, dtypes and conventions): they make inputs contiguous and cast
coefficients to the coefficient dtype. Stream tensors keep their shape ``[..., n, C]`` (the ops
flatten the leading dimensions themselves): a reshape here would put a view between the ops and
autograd, and the gradients of ``x`` from mappings, pre and post_res would then be summed into a
fresh tensor instead of in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from mhc_megatron.ops.checks import check_choice, coefficient_dtype

CPU_ISA_LEVELS = ("scalar", "avx2", "avx512")
CPU_ONLY_OPS = ("hc_mappings_pre",)
CPU_ISA_VARIABLE = "MHC_CPU_ISA"
if os.environ.get(CPU_ISA_VARIABLE, "auto") != "auto":
    check_choice(CPU_ISA_VARIABLE, os.environ[CPU_ISA_VARIABLE], CPU_ISA_LEVELS + ("auto",))

try:
    from mhc_megatron import _C
except ImportError as error:  # not built (MHC_BUILD=none) or built for another torch
    _C = None
    _IMPORT_ERROR = str(error)
else:
    _IMPORT_ERROR = ""


def unavailable_reason(device: torch.device, op: str | None = None) -> str | None:
    """Why the fused ops (or the fused ``op``, when given) cannot run on ``device`` (None when they can)."""
    if _C is None:
        return f"extension mhc_megatron._C not built or not loadable: {_IMPORT_ERROR}"
    if device.type == "cuda" and not _C.with_cuda:
        return "extension built without CUDA (MHC_BUILD=cpu, or no nvcc at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type!r}"
    if device.type == "cuda" and op in CPU_ONLY_OPS:
        return f"no CUDA kernel for {op}"
    return None


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(unavailable_reason(torch.device("cpu")))


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels run at (chosen on first use if not yet)."""
    _require_extension()
    return torch.ops.mhc_megatron.cpu_isa()


def cpu_isa_levels() -> list[str]:
    """The levels of ``CPU_ISA_LEVELS`` that this CPU can run, lowest first."""
    _require_extension()
    return list(torch.ops.mhc_megatron.cpu_isa_levels())


def set_cpu_isa(level: str) -> None:
    """Run the CPU kernels at ``level`` (one of ``CPU_ISA_LEVELS``, or ``auto``: the highest this
    CPU runs); a level this CPU cannot run raises ``ValueError``."""
    check_choice("level", level, CPU_ISA_LEVELS + ("auto",))
    _require_extension()
    torch.ops.mhc_megatron.set_cpu_isa(level)


@contextlib.contextmanager
def use_cpu_isa(level: str) -> Iterator[None]:
    """``set_cpu_isa(level)`` for the duration of a ``with`` block."""
    saved = cpu_isa()
    set_cpu_isa(level)
    try:
        yield
    finally:
        set_cpu_isa(saved)


def _coefficients(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    n = logits.shape[-1]
    flat = _coefficients(logits, coefficient_dtype(logits.dtype)).reshape(-1, n, n)
    return torch.ops.mhc_megatron.sinkhorn_fwd(flat, iters).reshape(logits.shape)


def _mapping_arguments(x, phi, alpha, bias, iters, eps) -> tuple:
    """The arguments of ``mappings_fwd`` and ``mappings_pre_fwd`` as the kernels take them."""
    dtype = coefficient_dtype(x.dtype)
    return (x.contiguous(), _coefficients(phi, dtype), _coefficients(alpha, dtype), _coefficients(bias, dtype),
            iters, eps)


def _per_token(x, h_pre, h_post, h_res) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' flat coefficients ``[T, ...]`` shaped with the leading dimensions of ``x``."""
    n, lead = x.shape[-2], x.shape[:-2]
    return h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def mappings(x, phi, alpha, bias, iters, eps):
    h_pre, h_post, h_res, _ = torch.ops.mhc_megatron.mappings_fwd(*_mapping_arguments(x, phi, alpha, bias, iters, eps))
    return _per_token(x, h_pre, h_post, h_res)


def mappings_pre(x, phi, alpha, bias, iters, eps, stream_gradient: StreamGradient | None = None):
    """As the reference; with ``stream_gradient``, its backward adds the gradient post_res hands off."""
    outputs = _taking_hand_off("mappings_pre", _mapping_arguments(x, phi, alpha, bias, iters, eps), stream_gradient)
    layer_input, h_pre, h_post, h_res, _ = outputs
    return layer_input, *_per_token(x, h_pre, h_post, h_res)


def hc_mappings_pre(x, weight, alpha, static_pre, static_post, static_res, eps,
                    stream_gradient: StreamGradient | None = None):
    """As the reference; with ``stream_gradient``, its backward adds the gradient post_res hands off."""
    dtype = coefficient_dtype(x.dtype)
    parameters = (_coefficients(t, dtype) for t in (weight, alpha, static_pre, static_post, static_res))
    outputs = _taking_hand_off("hc_mappings_pre", (x.contiguous(), *parameters, eps), stream_gradient)
    layer_input, h_pre, h_post, h_res, _ = outputs
    return layer_input, *_per_token(x, h_pre, h_post, h_res)


def pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    n = x.shape[-2]
    return torch.ops.mhc_megatron.pre_fwd(
        x.contiguous(), _coefficients(h_pre, coefficient_dtype(x.dtype)).reshape(-1, n)
    )


def _post_res_arguments(x, f, h_post, h_res) -> tuple:
    """The arguments of ``post_res_fwd`` as the kernels take them (also the first four of
    ``post_res_mappings_pre_fwd``)."""
    n = x.shape[-2]
    dtype = coefficient_dtype(x.dtype)
    return (x.contiguous(), f.to(x.dtype).contiguous(), _coefficients(h_post, dtype).reshape(-1, n),
            _coefficients(h_res, dtype).reshape(-1, n, n))


def post_res(x: torch.Tensor, f: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor,
             stream_gradient: StreamGradient | None = None) -> torch.Tensor:
    """As the reference, except that ``f`` is cast to the dtype of ``x`` first when they differ; with
    ``stream_gradient`` accepting (its fused mappings_pre ran), the gradient of ``x`` is handed off."""
    args = _post_res_arguments(x, f, h_post, h_res)
    if _hands_off(stream_gradient) and stream_gradient.accepting:
        return _PostResHandingOff.apply(*args, stream_gradient)
    return torch.ops.mhc_megatron.post_res_fwd(*args)


def post_res_mappings_pre(x, f, h_post, h_res, phi, alpha, bias, iters, eps,
                          stream_gradient: StreamGradient | None = None,
                          next_stream_gradient: StreamGradient | None = None):
    """As the reference; ``stream_gradient`` as ``post_res``'s and ``next_stream_gradient`` as
    ``mappings_pre``'s (the op gives the first hand-off and takes the second)."""
    if x.device.type != "cpu":
        streams = post_res(x, f, h_post, h_res, stream_gradient)
        return (streams, *mappings_pre(streams, phi, alpha, bias, iters, eps, next_stream_gradient))
    args = (*_post_res_arguments(x, f, h_post, h_res), *_mapping_arguments(x, phi, alpha, bias, iters, eps)[1:])
    if _hands_off(stream_gradient) or _hands_off(next_stream_gradient):
        outputs = _PostResMappingsPre.apply(stream_gradient, next_stream_gradient, *args)
    else:
        outputs = torch.ops.mhc_megatron.post_res_mappings_pre_fwd(*args)
    streams, layer_input, h_pre, h_post, h_res, _ = outputs
    return (streams, layer_input, *_per_token(x, h_pre, h_post, h_res))


def _grad(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An output gradient as the kernels take it: dense, contiguous, in the output's dtype."""
    return torch.zeros_like(like) if grad is None else grad.to(like.dtype).contiguous()


class StreamGradient:
    """The hand-off of one connection's stream gradient from ``post_res`` to ``mappings_pre`` (mHC)
    or ``hc_mappings_pre`` (HC), the op that read the sub-layer input: the taker.

    The streams ``x`` of a sub-layer feed both ops, so autograd would add their two gradients of
    ``x`` (a pass over ``3 n C`` values per token). With a hand-off, post_res's backward keeps its
    gradient here and returns none, and the taker's backward, which runs after it (post_res reads
    its outputs), adds it while writing its own: the stream gradient is written once.
    ``accepting`` is set by the fused taker; a ``post_res`` that sees it unset (another backend ran
    the taker, or it ran without autograd) returns its gradient to autograd as usual.
    """

    __slots__ = ("accepting", "_grad")

    def __init__(self) -> None:
        self.accepting = False
        self._grad: torch.Tensor | None = None

    def put(self, grad: torch.Tensor) -> None:
        self._grad = grad if self._grad is None else self._grad + grad

    def take(self) -> torch.Tensor | None:
        grad, self._grad = self._grad, None
        return grad


def _hands_off(stream_gradient: StreamGradient | None) -> bool:
    """Whether an op takes part in ``stream_gradient``'s hand-off now: eager code recording autograd
    (a compiled graph differentiates the registered ops, without it)."""
    return stream_gradient is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _taking_hand_off(op: str, args: tuple, stream_gradient: StreamGradient | None) -> tuple:
    """The outputs of the taker ``op``'s forward kernel on ``args``, through ``_TakingHandOff`` when
    ``stream_gradient`` is to be handed to it."""
    if _hands_off(stream_gradient):
        return _TakingHandOff.apply(op, stream_gradient, *args)
    return getattr(torch.ops.mhc_megatron, f"{op}_fwd")(*args)


def _handed(ctx) -> torch.Tensor | None:
    """The stream gradient post_res handed to a taker's backward, if any."""
    return None if ctx.stream_gradient is None else ctx.stream_gradient.take()


def _mappings_pre_setup(ctx, inputs, output) -> None:
    x, phi, alpha, bias, ctx.iters, _ = inputs
    _, h_pre, h_post, h_res, saved = output
    ctx.save_for_backward(x, phi, alpha, bias, h_pre, h_post, h_res, saved)
    ctx.stream_gradient = None


def _mappings_pre_backward(ctx, grad_input, grad_pre, grad_post, grad_res, _grad_saved):
    x, phi, alpha, bias, h_pre, h_post, h_res, saved = ctx.saved_tensors
    handed = _handed(ctx)
    grads = torch.ops.mhc_megatron.mappings_pre_bwd(
        _grad(grad_input, x[..., 0, :]), _grad(grad_pre, h_pre), _grad(grad_post, h_post),
        _grad(grad_res, h_res), None if handed is None else _grad(handed, x), x, phi, alpha, bias, h_pre, saved,
        ctx.iters,
    )
    return (*grads, None, None)


def _hc_mappings_pre_setup(ctx, inputs, output) -> None:
    x, weight, alpha, *_ = inputs
    _, h_pre, h_post, h_res, saved = output
    ctx.save_for_backward(x, weight, alpha, h_pre, h_post, h_res, saved)
    ctx.stream_gradient = None


def _hc_mappings_pre_backward(ctx, grad_input, grad_pre, grad_post, grad_res, _grad_saved):
    x, weight, alpha, h_pre, h_post, h_res, saved = ctx.saved_tensors
    handed = _handed(ctx)
    grads = torch.ops.mhc_megatron.hc_mappings_pre_bwd(
        _grad(grad_input, x[..., 0, :]), _grad(grad_pre, h_pre), _grad(grad_post, h_post), _grad(grad_res, h_res),
        None if handed is None else _grad(handed, x), x, weight, alpha, h_pre, saved,
    )
    return (*grads, None)


# The taker ops of the hand-off: their setup_context and backward (register_autograd's).
_TAKERS = {"mappings_pre": (_mappings_pre_setup, _mappings_pre_backward),
           "hc_mappings_pre": (_hc_mappings_pre_setup, _hc_mappings_pre_backward)}


def _post_res_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.stream_gradient = None


def _post_res_backward(ctx, grad):
    x, f, h_post, h_res = ctx.saved_tensors
    grads = torch.ops.mhc_megatron.post_res_bwd(_grad(grad, x), x, f, h_post, h_res)
    if ctx.stream_gradient is None:
        return grads
    ctx.stream_gradient.put(grads[0])
    return None, *grads[1:]


class _TakingHandOff(torch.autograd.Function):
    """The forward kernel of a taker ``op`` (``_TAKERS``) whose backward adds the gradient ``post_res``
    hands off."""

    @staticmethod
    def forward(ctx, op, stream_gradient, *args):
        setup, ctx.backward_of_op = _TAKERS[op]
        output = getattr(torch.ops.mhc_megatron, f"{op}_fwd")(*args)
        setup(ctx, args, output)
        ctx.stream_gradient = stream_gradient
        stream_gradient.accepting = True
        ctx.mark_non_differentiable(output[-1])
        return output

    @staticmethod
    def backward(ctx, *grads):
        return None, None, *ctx.backward_of_op(ctx, *grads)


class _PostResHandingOff(torch.autograd.Function):
    """``post_res_fwd`` whose backward hands the gradient of ``x`` off instead of returning it."""

    @staticmethod
    def forward(ctx, x, f, h_post, h_res, stream_gradient):
        _post_res_setup(ctx, (x, f, h_post, h_res), None)
        ctx.stream_gradient = stream_gradient
        return torch.ops.mhc_megatron.post_res_fwd(x, f, h_post, h_res)

    @staticmethod
    def backward(ctx, grad):
        return *_post_res_backward(ctx, grad), None


def _post_res_mappings_pre_setup(ctx, inputs, output) -> None:
    x, f, h_post, h_res, phi, alpha, bias, ctx.iters, _ = inputs
    streams, _, next_h_pre, _, _, saved = output
    ctx.save_for_backward(x, f, h_post, h_res, streams, phi, alpha, bias, next_h_pre, saved)


def _post_res_mappings_pre_grads(ctx, grad_streams, grad_input, grad_pre, grad_post, grad_res):
    """The backward kernel's seven gradients; ``grad_streams`` (None: none) is added to the streams'."""
    x, f, h_post, h_res, streams, phi, alpha, bias, next_h_pre, saved = ctx.saved_tensors
    # The next coefficients have the shapes of next_h_pre ([T, n]) and of h_res ([T, n, n]).
    return torch.ops.mhc_megatron.post_res_mappings_pre_bwd(
        _grad(grad_input, f), _grad(grad_pre, next_h_pre), _grad(grad_post, next_h_pre),
        _grad(grad_res, h_res), None if grad_streams is None else _grad(grad_streams, x), x, f, h_post, h_res,
        streams, phi, alpha, bias, next_h_pre, saved, ctx.iters,
    )


class _PostResMappingsPre(torch.autograd.Function):
    """``post_res_mappings_pre_fwd`` taking part in two hand-offs: its post_res gives the gradient of
    ``x`` to ``stream_gradient`` (when accepting), its mappings_pre takes what the next post_res gives
    to ``next_stream_gradient``."""

    @staticmethod
    def forward(ctx, stream_gradient, next_stream_gradient, *args):
        output = torch.ops.mhc_megatron.post_res_mappings_pre_fwd(*args)
        _post_res_mappings_pre_setup(ctx, args, output)
        ctx.stream_gradient = stream_gradient if stream_gradient is not None and stream_gradient.accepting else None
        ctx.next_stream_gradient = next_stream_gradient
        if next_stream_gradient is not None:
            next_stream_gradient.accepting = True
        ctx.mark_non_differentiable(output[-1])
        ctx.set_materialize_grads(False)  # the streams' gradient is None when every reader handed it off
        return output

    @staticmethod
    def backward(ctx, grad_streams, grad_input, grad_pre, grad_post, grad_res, _grad_saved):
        handed = None if ctx.next_stream_gradient is None else ctx.next_stream_gradient.take()
        if handed is not None and grad_streams is not None:
            handed = handed + grad_streams
        grads = _post_res_mappings_pre_grads(ctx, grad_streams if handed is None else handed, grad_input,
                                             grad_pre, grad_post, grad_res)
        if ctx.stream_gradient is not None:
            ctx.stream_gradient.put(grads[0])
            grads = (None, *grads[1:])
        return None, None, *grads, None, None


def _register() -> None:
    lib = "mhc_megatron::"

    @torch.library.register_fake(lib + "sinkhorn_fwd")
    def _(logits, iters):
        return torch.empty_like(logits)

    @torch.library.register_fake(lib + "sinkhorn_bwd")
    def _(logits, grad_out, iters):
        return torch.empty_like(logits)

    @torch.library.register_fake(lib + "mappings_fwd")
    def mappings_fake(x, phi, alpha, bias, iters, eps):
        tokens, n = x.shape[:-2].numel(), x.shape[-2]
        return (phi.new_empty(tokens, n), phi.new_empty(tokens, n), phi.new_empty(tokens, n, n),
                phi.new_empty(tokens, n * n + 2 * n + 1))

    @torch.library.register_fake(lib + "mappings_bwd")
    def _(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved, iters):
        return torch.empty_like(x), torch.empty_like(phi), torch.empty_like(alpha), torch.empty_like(bias)

    @torch.library.register_fake(lib + "mappings_pre_fwd")
    def _(x, phi, alpha, bias, iters, eps):
        return (x.new_empty(*x.shape[:-2], x.shape[-1]), *mappings_fake(x, phi, alpha, bias, iters, eps))

    @torch.library.register_fake(lib + "mappings_pre_bwd")
    def _(grad_input, grad_pre, grad_post, grad_res, grad_x, x, phi, alpha, bias, h_pre, saved, iters):
        return torch.empty_like(x), torch.empty_like(phi), torch.empty_like(alpha), torch.empty_like(bias)

    @torch.library.register_fake(lib + "hc_mappings_pre_fwd")
    def _(x, weight, alpha, static_pre, static_post, static_res, eps):
        tokens, n = x.shape[:-2].numel(), x.shape[-2]
        return (x.new_empty(*x.shape[:-2], x.shape[-1]), weight.new_empty(tokens, n), weight.new_empty(tokens, n),
                weight.new_empty(tokens, n, n), weight.new_empty(tokens, n, n + 3))

    @torch.library.register_fake(lib + "hc_mappings_pre_bwd")
    def _(grad_input, grad_pre, grad_post, grad_res, grad_x, x, weight, alpha, h_pre, saved):
        n = x.shape[-2]
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(alpha), weight.new_empty(n),
                weight.new_empty(n), weight.new_empty(n, n))

    @torch.library.register_fake(lib + "pre_fwd")
    def _(x, h_pre):
        return x.new_empty(*x.shape[:-2], x.shape[-1])

    @torch.library.register_fake(lib + "pre_bwd")
    def _(grad_out, x, h_pre):
        return torch.empty_like(x), torch.empty_like(h_pre)

    @torch.library.register_fake(lib + "post_res_fwd")
    def _(x, f, h_post, h_res):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "post_res_bwd")
    def _(grad_out, x, f, h_post, h_res):
        return torch.empty_like(x), torch.empty_like(f), torch.empty_like(h_post), torch.empty_like(h_res)

    @torch.library.register_fake(lib + "post_res_mappings_pre_fwd")
    def _(x, f, h_post, h_res, phi, alpha, bias, iters, eps):
        return (torch.empty_like(x), x.new_empty(*x.shape[:-2], x.shape[-1]),
                *mappings_fake(x, phi, alpha, bias, iters, eps))

    @torch.library.register_fake(lib + "post_res_mappings_pre_bwd")
    def _(grad_input, grad_pre, grad_post, grad_res, grad_streams, x, f, h_post, h_res, streams, phi, alpha, bias,
          next_h_pre, saved, iters):
        return (torch.empty_like(x), torch.empty_like(f), torch.empty_like(h_post), torch.empty_like(h_res),
                torch.empty_like(phi), torch.empty_like(alpha), torch.empty_like(bias))

    def post_res_mappings_pre_backward(ctx, grad_streams, grad_input, grad_pre, grad_post, grad_res, _grad_saved):
        return (*_post_res_mappings_pre_grads(ctx, grad_streams, grad_input, grad_pre, grad_post, grad_res), None,
                None)

    def sinkhorn_setup(ctx, inputs, output):
        logits, ctx.iters = inputs
        ctx.save_for_backward(logits)

    def sinkhorn_backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return torch.ops.mhc_megatron.sinkhorn_bwd(logits, _grad(grad, logits), ctx.iters), None

    def mappings_setup(ctx, inputs, output):
        x, phi, alpha, bias, ctx.iters, _ = inputs
        ctx.save_for_backward(x, phi, alpha, bias, *output)

    def mappings_backward(ctx, grad_pre, grad_post, grad_res, _grad_saved):
        x, phi, alpha, bias, h_pre, h_post, h_res, saved = ctx.saved_tensors
        grads = torch.ops.mhc_megatron.mappings_bwd(
            _grad(grad_pre, h_pre), _grad(grad_post, h_post), _grad(grad_res, h_res),
            x, phi, alpha, bias, saved, ctx.iters,
        )
        return (*grads, None, None)

    def pre_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def pre_backward(ctx, grad):
        x, h_pre = ctx.saved_tensors
        return torch.ops.mhc_megatron.pre_bwd(_grad(grad, x[..., 0, :]), x, h_pre)

    torch.library.register_autograd(lib + "sinkhorn_fwd", sinkhorn_backward, setup_context=sinkhorn_setup)
    torch.library.register_autograd(lib + "mappings_fwd", mappings_backward, setup_context=mappings_setup)
    torch.library.register_autograd(lib + "mappings_pre_fwd", _mappings_pre_backward,
                                    setup_context=_mappings_pre_setup)
    torch.library.register_autograd(lib + "hc_mappings_pre_fwd", _hc_mappings_pre_backward,
                                    setup_context=_hc_mappings_pre_setup)
    torch.library.register_autograd(lib + "pre_fwd", pre_backward, setup_context=pre_setup)
    torch.library.register_autograd(lib + "post_res_fwd", _post_res_backward, setup_context=_post_res_setup)
    torch.library.register_autograd(lib + "post_res_mappings_pre_fwd", post_res_mappings_pre_backward,
                                    setup_context=_post_res_mappings_pre_setup)


if _C is not None:
    _register()

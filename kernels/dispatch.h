// Argument checks and compile-time dispatch shared by the CPU and CUDA implementations.
//
// The Python wrappers (mhc_megatron/ops/fused.py) validate the public arguments and hand the ops
// contiguous tensors of shape [..., n, C] (streams, the T tokens being the leading dimensions,
// kept as they are so that no view sits between the ops and autograd), [T, n] / [T, n, n]
// (coefficients, float32 or float64) and [n*C, K] (phi). These checks guard the ops when they
// are called directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "mhc_math.h"

namespace mhc {

inline void check_input(const at::Tensor& t, const char* name, int64_t rank, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// Coefficient dtype of streams of dtype s: float64 for float64, float32 otherwise.
inline at::ScalarType coefficient_type(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

inline int checked_streams(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= kMaxStreams, "the number of streams n must be in 1..", kMaxStreams,
              ", got ", n);
  return static_cast<int>(n);
}

inline int checked_iters(int64_t iters) {
  TORCH_CHECK(iters >= 0 && iters <= (1 << 20), "iters must be in 0..", 1 << 20, ", got ", iters);
  return static_cast<int>(iters);
}

// Shape of a stream tensor [..., n, C]: T = the product of the leading dimensions.
struct Streams {
  int64_t tokens;
  int n;
  int64_t hidden;
};

inline Streams check_streams(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "x must have shape [..., n, C], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const int64_t tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 2);
  return {tokens, checked_streams(x.size(-2)), x.size(-1)};
}

// Shape [..., C] of one stream row of x [..., n, C].
inline std::vector<int64_t> row_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(x.size(-1));
  return shape;
}

// Per-token coefficients of streams s: shape [T, dims...] in the coefficient dtype.
inline void check_coefficients(const at::Tensor& t, const char* name, const Streams& s,
                               at::ScalarType x_type, at::IntArrayRef dims) {
  std::vector<int64_t> expected{s.tokens};
  expected.insert(expected.end(), dims.begin(), dims.end());
  check_input(t, name, static_cast<int64_t>(expected.size()), coefficient_type(x_type));
  check_shape(t, name, expected);
}

// A tensor shaped like x (or like one stream row [..., C] when `row`), in x's dtype.
inline void check_like_streams(const at::Tensor& t, const char* name, const at::Tensor& x, bool row) {
  check_streams(x);
  if (row) {
    check_input(t, name, x.dim() - 1, x.scalar_type());
    check_shape(t, name, row_shape(x));
  } else {
    check_input(t, name, x.dim(), x.scalar_type());
    check_shape(t, name, x.sizes());
  }
}

inline void check_mapping_params(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                                 const at::Tensor& bias) {
  const Streams s = check_streams(x);
  const at::ScalarType a = coefficient_type(x.scalar_type());
  const int64_t k = num_columns(s.n);
  check_input(phi, "phi", 2, a);
  check_shape(phi, "phi", {s.n * s.hidden, k});
  check_input(alpha, "alpha", 1, a);
  check_shape(alpha, "alpha", {3});
  check_input(bias, "bias", 1, a);
  check_shape(bias, "bias", {k});
}

// Sinkhorn logits [T, n, n] in float32 or float64; returns n.
inline int check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3, "logits must have shape [T, n, n], got ", logits.sizes());
  check_input(logits, "logits", 3, coefficient_type(logits.scalar_type()));
  const int n = checked_streams(logits.size(2));
  check_shape(logits, "logits", {logits.size(0), n, n});
  return n;
}

inline void check_post_res(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                    const at::Tensor& h_res) {
  const Streams s = check_streams(x);
  check_like_streams(f, "f", x, /*row=*/true);
  check_coefficients(h_post, "h_post", s, x.scalar_type(), {s.n});
  check_coefficients(h_res, "h_res", s, x.scalar_type(), {s.n, s.n});
}

// Checked arguments and freshly allocated outputs of each op, shared by the CPU and CUDA wrappers.
using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor sinkhorn_fwd_outputs(const at::Tensor& logits) {
  check_logits(logits);
  return at::empty_like(logits);
}

inline at::Tensor sinkhorn_bwd_outputs(const at::Tensor& logits, const at::Tensor& grad_out) {
  check_logits(logits);
  check_input(grad_out, "grad_out", 3, logits.scalar_type());
  check_shape(grad_out, "grad_out", logits.sizes());
  return at::empty_like(logits);
}

inline Four mappings_fwd_outputs(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                                 const at::Tensor& bias) {
  const Streams s = check_streams(x);
  check_mapping_params(x, phi, alpha, bias);
  const auto opts = phi.options();
  return {at::empty({s.tokens, s.n}, opts), at::empty({s.tokens, s.n}, opts),
          at::empty({s.tokens, s.n, s.n}, opts), at::empty({s.tokens, num_columns(s.n) + 1}, opts)};
}

inline void check_mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                               const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                               const at::Tensor& bias, const at::Tensor& saved) {
  const Streams s = check_streams(x);
  check_mapping_params(x, phi, alpha, bias);
  check_coefficients(grad_pre, "grad_pre", s, x.scalar_type(), {s.n});
  check_coefficients(grad_post, "grad_post", s, x.scalar_type(), {s.n});
  check_coefficients(grad_res, "grad_res", s, x.scalar_type(), {s.n, s.n});
  check_coefficients(saved, "saved", s, x.scalar_type(), {num_columns(s.n) + 1});
}
inline Four mappings_bwd_outputs(const at::Tensor& grad_pre, const at::Tensor& grad_post,
                                 const at::Tensor& grad_res, const at::Tensor& x, const at::Tensor& phi,
                                 const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& saved) {
  check_mappings_bwd(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved);
  return {at::empty_like(x), at::empty_like(phi), at::empty_like(alpha), at::empty_like(bias)};
}

// mappings_pre: the sub-layer input [..., C] in x's dtype, then mappings' outputs.
inline Five mappings_pre_fwd_outputs(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                                     const at::Tensor& bias) {
  auto [h_pre, h_post, h_res, saved] = mappings_fwd_outputs(x, phi, alpha, bias);
  return {at::empty(row_shape(x), x.options()), h_pre, h_post, h_res, saved};
}

// The arguments of mappings_pre_bwd that mappings_bwd does not have (also hc_mappings_pre_bwd's).
inline void check_mappings_pre_bwd(const at::Tensor& grad_input, const std::optional<at::Tensor>& grad_x_in,
                                   const at::Tensor& x, const at::Tensor& h_pre) {
  const Streams s = check_streams(x);
  check_like_streams(grad_input, "grad_input", x, /*row=*/true);
  check_coefficients(h_pre, "h_pre", s, x.scalar_type(), {s.n});
  if (grad_x_in.has_value()) check_like_streams(*grad_x_in, "grad_x", x, /*row=*/false);
}

inline Four mappings_pre_bwd_outputs(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                     const at::Tensor& grad_post, const at::Tensor& grad_res,
                                     const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                                     const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                                     const at::Tensor& h_pre, const at::Tensor& saved) {
  check_mappings_pre_bwd(grad_input, grad_x_in, x, h_pre);
  return mappings_bwd_outputs(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved);
}

// hc_mappings_pre: weight [C, n + 2], alpha [3], static_pre [n], static_post [n], static_res [n, n]
// in the coefficient dtype; saved is [T, n, n + 3] (hc_saved_width).
inline void check_hc_weights(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha) {
  const Streams s = check_streams(x);
  const at::ScalarType a = coefficient_type(x.scalar_type());
  check_input(weight, "weight", 2, a);
  check_shape(weight, "weight", {s.hidden, hc_columns(s.n)});
  check_input(alpha, "alpha", 1, a);
  check_shape(alpha, "alpha", {3});
}

inline Five hc_mappings_pre_fwd_outputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                                        const at::Tensor& static_pre, const at::Tensor& static_post,
                                        const at::Tensor& static_res) {
  const Streams s = check_streams(x);
  check_hc_weights(x, weight, alpha);
  const at::ScalarType a = coefficient_type(x.scalar_type());
  check_input(static_pre, "static_pre", 1, a);
  check_shape(static_pre, "static_pre", {s.n});
  check_input(static_post, "static_post", 1, a);
  check_shape(static_post, "static_post", {s.n});
  check_input(static_res, "static_res", 2, a);
  check_shape(static_res, "static_res", {s.n, s.n});
  const auto opts = weight.options();
  return {at::empty(row_shape(x), x.options()), at::empty({s.tokens, s.n}, opts), at::empty({s.tokens, s.n}, opts),
          at::empty({s.tokens, s.n, s.n}, opts), at::empty({s.tokens, s.n, hc_saved_width(s.n)}, opts)};
}

using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (grad_x, grad_weight, grad_alpha, grad_static_pre, grad_static_post, grad_static_res).
inline Six hc_mappings_pre_bwd_outputs(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                       const at::Tensor& grad_post, const at::Tensor& grad_res,
                                       const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                                       const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& h_pre,
                                       const at::Tensor& saved) {
  const Streams s = check_streams(x);
  check_hc_weights(x, weight, alpha);
  check_mappings_pre_bwd(grad_input, grad_x_in, x, h_pre);
  check_coefficients(grad_pre, "grad_pre", s, x.scalar_type(), {s.n});
  check_coefficients(grad_post, "grad_post", s, x.scalar_type(), {s.n});
  check_coefficients(grad_res, "grad_res", s, x.scalar_type(), {s.n, s.n});
  check_coefficients(saved, "saved", s, x.scalar_type(), {s.n, hc_saved_width(s.n)});
  const auto opts = weight.options();
  return {at::empty_like(x), at::empty_like(weight), at::empty_like(alpha), at::empty({s.n}, opts),
          at::empty({s.n}, opts), at::empty({s.n, s.n}, opts)};
}

// post_res_mappings_pre: post_res's output `streams` (shaped like x), then mappings_pre's outputs on
// it (the next sub-layer's input and coefficients, and saved).
inline Six post_res_mappings_pre_fwd_outputs(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                                             const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                                             const at::Tensor& bias) {
  check_post_res(x, f, h_post, h_res);
  at::Tensor streams = at::empty_like(x);
  auto [layer_input, next_h_pre, next_h_post, next_h_res, saved] = mappings_pre_fwd_outputs(streams, phi, alpha, bias);
  return {streams, layer_input, next_h_pre, next_h_post, next_h_res, saved};
}
using Seven = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (grad_x, grad_f, grad_h_post, grad_h_res, grad_phi, grad_alpha, grad_bias): post_res's gradients,
// then the mapping parameters'. grad_streams, when given, is the gradient of `streams` from elsewhere.
inline Seven post_res_mappings_pre_bwd_outputs(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                               const at::Tensor& grad_post, const at::Tensor& grad_res,
                                               const std::optional<at::Tensor>& grad_streams, const at::Tensor& x,
                                               const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res,
                                               const at::Tensor& streams, const at::Tensor& phi,
                                               const at::Tensor& alpha, const at::Tensor& bias,
                                               const at::Tensor& next_h_pre, const at::Tensor& saved) {
  check_post_res(x, f, h_post, h_res);
  check_like_streams(streams, "streams", x, /*row=*/false);
  check_mappings_pre_bwd(grad_input, grad_streams, streams, next_h_pre);
  check_mappings_bwd(grad_pre, grad_post, grad_res, streams, phi, alpha, bias, saved);
  return {at::empty_like(x),   at::empty_like(f),     at::empty_like(h_post), at::empty_like(h_res),
          at::empty_like(phi), at::empty_like(alpha), at::empty_like(bias)};
}
inline at::Tensor pre_fwd_output(const at::Tensor& x, const at::Tensor& h_pre) {
  const Streams s = check_streams(x);
  check_coefficients(h_pre, "h_pre", s, x.scalar_type(), {s.n});
  return at::empty(row_shape(x), x.options());
}

inline std::tuple<at::Tensor, at::Tensor> pre_bwd_outputs(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& h_pre) {
  const Streams s = check_streams(x);
  check_coefficients(h_pre, "h_pre", s, x.scalar_type(), {s.n});
  check_like_streams(grad_out, "grad_out", x, /*row=*/true);
  return {at::empty_like(x), at::empty_like(h_pre)};
}

inline at::Tensor post_res_fwd_output(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                                      const at::Tensor& h_res) {
  check_post_res(x, f, h_post, h_res);
  return at::empty_like(x);
}

inline Four post_res_bwd_outputs(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f,
                                 const at::Tensor& h_post, const at::Tensor& h_res) {
  check_post_res(x, f, h_post, h_res);
  check_like_streams(grad_out, "grad_out", x, /*row=*/false);
  return {at::empty_like(x), at::empty_like(f), at::empty_like(h_post), at::empty_like(h_res)};
}

// The number of chunks of a weight-gradient reduction over tokens, of about tokens_per_chunk tokens
// each: it depends on the shapes only (never on threads), and keeps the partial buffer under ~16M values.
inline int64_t reduction_chunks(int64_t tokens, int64_t partial_size, int64_t tokens_per_chunk = 256) {
  const int64_t by_tokens = (tokens + tokens_per_chunk - 1) / tokens_per_chunk;
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(partial_size, 1));
  return std::max<int64_t>(1, std::min<int64_t>({by_tokens, by_memory, 32}));
}

}  // namespace mhc

// Runs the statements with `NT` a compile-time stream count (fast paths for powers of two) or 0,
// meaning "n known at run time only" (n = 3, 5, ..., 15).
#define MHC_DISPATCH_STREAMS(n, NT, ...)        \
  switch (n) {                                   \
    case 1: { constexpr int NT = 1; __VA_ARGS__; break; }   \
    case 2: { constexpr int NT = 2; __VA_ARGS__; break; }   \
    case 4: { constexpr int NT = 4; __VA_ARGS__; break; }   \
    case 8: { constexpr int NT = 8; __VA_ARGS__; break; }   \
    case 16: { constexpr int NT = 16; __VA_ARGS__; break; } \
    default: { constexpr int NT = 0; __VA_ARGS__; break; }  \
  }

// The stream dtypes every op accepts.
#define MHC_DISPATCH_FLOATS(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// Applies X(m, op) to each of the ten ops every backend implements (each file's own mhc::*_fwd / *_bwd).
#define MHC_FOR_EACH_KERNEL(X, m)                                                                       \
  X(m, sinkhorn_fwd) X(m, sinkhorn_bwd) X(m, mappings_fwd) X(m, mappings_bwd) X(m, mappings_pre_fwd)   \
  X(m, mappings_pre_bwd) X(m, pre_fwd) X(m, pre_bwd) X(m, post_res_fwd) X(m, post_res_bwd)

#define MHC_IMPL_KERNEL(m, op) m.impl(#op, &mhc::op);

// Registers one backend's ten kernels for dispatch `KEY`.
#define MHC_REGISTER_KERNELS(KEY) \
  TORCH_LIBRARY_IMPL(mhc_megatron, KEY, m) { MHC_FOR_EACH_KERNEL(MHC_IMPL_KERNEL, m) }

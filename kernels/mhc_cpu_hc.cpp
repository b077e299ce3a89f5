// CPU kernels of hc_mappings_pre: HC's mappings and the sub-layer input in one op (C++, parallel
// over tokens with at::parallel_for). The per-token coefficient math is mhc_math.h's (hc_*); the
// row loops run a hardware vector of columns c at a time (cpu_vec.h) and read W transposed, so
// that the n + 2 columns of W are n + 2 contiguous rows. Compiled once per instruction-set level.
//
// Forward, per token: per stream i one pass over x_i for sum(x_i^2) and the n + 2 dot products
// x_i . W[:, k] (the norm is applied after the projection: u = (x_i @ W) / r_i), the
// coefficients, then layer_input = sum_i h_pre[i] x_i while the token's rows are in cache.
// Backward, per token: the dot products of the input's gradient with the streams (the rest of
// h_pre's gradient), the coefficient backward, then one pass writing the whole stream gradient
//   dx_i = h_pre[i] g_u + dm_i @ W^T + c_i x_i (+ grad_x_in_i)
// and adding x_i dm_i^T to the token chunk's share of dW. Chunks are fixed by the shapes
// (reduction_chunks), their tokens run in order, and the chunks are summed in order: the
// gradients are bit-identical run to run and at any thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_stream_rows.h"

namespace mhc {
namespace cpu {

// W^T [K][hidden] from W [hidden][K].
template <typename A>
std::vector<A> transposed_weight(const A* weight, int64_t hidden, int K) {
  std::vector<A> wt(K * hidden);
  at::parallel_for(0, hidden, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int k = 0; k < K; ++k) wt[k * hidden + c] = weight[c * K + k];
  });
  return wt;
}

// Columns of W for NT streams known at compile time (NT > 0), else the largest count.
template <int NT>
constexpr int kHcColumnSlots = kStreamSlots<NT> + 2;

// One stream row x [hidden]: m[k] = sum_c x[c] wt[k][c] for its K columns; returns sum(x^2). Lanes
// are summed in a fixed order.
template <int NT, typename S, typename A>
A project_stream_row(const S* x, const A* wt, int64_t hidden, int K, A* m) {
  Vec<A> squares = {};
  Vec<A> dots[kHcColumnSlots<NT>] = {};
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const Vec<A> v = load_vec<A, kFull>(x + c0, len);
    squares += v * v;
#pragma GCC unroll 18
    for (int k = 0; k < K; ++k) dots[k] += v * load_vec<A, kFull>(wt + k * hidden + c0, len);
  });
  for (int k = 0; k < K; ++k) m[k] = sum_lanes<A>(dots[k]);
  return sum_lanes<A>(squares);
}

template <int NT, typename S, typename A>
void hc_mappings_pre_fwd_kernel(const S* x, const A* weight, const A* alpha, const A* static_pre,
                                const A* static_post, const A* static_res, int64_t tokens, int n_rt,
                                int64_t hidden, A eps, S* layer_input, A* h_pre, A* h_post, A* h_res, A* saved) {
  const int n = NT > 0 ? NT : n_rt;
  const int K = hc_columns(n), width = hc_saved_width(n);
  const std::vector<A> wt = transposed_weight(weight, hidden, K);
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const S* xt = x + t * n * hidden;
      A* s = saved + t * n * width;
      for (int i = 0; i < n; ++i) {
        A* row = s + i * width;
        const A inv_r = inverse_rms(project_stream_row<NT>(xt + i * hidden, wt.data(), hidden, K, row), hidden, eps);
        for (int k = 0; k < K; ++k) row[k] *= inv_r;
        row[K] = inv_r;
      }
      hc_coefficients(s, alpha, static_pre, static_post, static_res, n, h_pre + t * n, h_post + t * n,
                      h_res + t * n * n);
      read_streams_row(xt, h_pre + t * n, n, hidden, layer_input + t * hidden);
    }
  });
}

// One token's stream gradient, written once, and its share of dW^T [K][hidden] (added to dwt):
//   dx_i = h_pre[i] g + c_i x_i + sum_k dm_i[k] wt[k] (+ grad_x_in_i),   dwt[k] += sum_i dm_i[k] x_i
// for x, grad_x_in, dx [n][hidden], g [hidden], dm [n][K], c [n].
template <int NT, typename S, typename A>
void hc_dx_row(const S* x, const S* g, const S* grad_x_in, const A* h_pre, const A* dm, const A* c,
               const A* wt, int n_rt, int64_t hidden, S* dx, A* dwt) {
  const int n = NT > 0 ? NT : n_rt;
  const int K = hc_columns(n);
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    Vec<A> w[kHcColumnSlots<NT>], dw[kHcColumnSlots<NT>];
#pragma GCC unroll 18
    for (int k = 0; k < K; ++k) {
      w[k] = load_vec<A, kFull>(wt + k * hidden + c0, len);
      dw[k] = load_vec<A, kFull>(dwt + k * hidden + c0, len);
    }
    const Vec<A> gv = load_vec<A, kFull>(g + c0, len);
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      const Vec<A> v = load_vec<A, kFull>(x + i * hidden + c0, len);
      Vec<A> d = h_pre[i] * gv + c[i] * v;
      if (grad_x_in != nullptr) d += load_vec<A, kFull>(grad_x_in + i * hidden + c0, len);
#pragma GCC unroll 18
      for (int k = 0; k < K; ++k) {
        d += dm[i * K + k] * w[k];
        dw[k] += dm[i * K + k] * v;
      }
      stream_vec<A, kFull>(d, len, dx + i * hidden + c0);  // read again after the sub-layer's backward
    }
#pragma GCC unroll 18
    for (int k = 0; k < K; ++k) store_vec<A, kFull>(dw[k], len, dwt + k * hidden + c0);
  });
}

template <int NT, typename S, typename A>
void hc_mappings_pre_bwd_kernel(const S* grad_input, const A* grad_pre, const A* grad_post, const A* grad_res,
                                const S* grad_x_in, const S* x, const A* weight, const A* alpha, const A* h_pre,
                                const A* saved, int64_t tokens, int n_rt, int64_t hidden, S* grad_x,
                                A* grad_weight, A* grad_alpha, A* grad_static_pre, A* grad_static_post,
                                A* grad_static_res) {
  const int n = NT > 0 ? NT : n_rt;
  const int K = hc_columns(n), width = hc_saved_width(n);
  const int small = 3 + 2 * n + n * n;  // dalpha | dstatic_pre | dstatic_post | dstatic_res
  const int64_t share = K * hidden + small;
  const std::vector<A> wt = transposed_weight(weight, hidden, K);
  const int64_t chunks = reduction_chunks(tokens, K * hidden);
  const int64_t chunk = (tokens + chunks - 1) / chunks;
  std::vector<A> partial(chunks * share, A(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    A dh[kMaxStreams], dm[kMaxStreams * (kMaxStreams + 2)], c[kMaxStreams];
    for (int64_t ch = begin; ch < end; ++ch) {
      A* dwt = partial.data() + ch * share;
      for (int64_t t = ch * chunk; t < std::min(tokens, (ch + 1) * chunk); ++t) {
        const S* xt = x + t * n * hidden;
        const S* g = grad_input + t * hidden;
        stream_dots_row<NT>(xt, g, n, hidden, dh);
        for (int i = 0; i < n; ++i) dh[i] += grad_pre[t * n + i];
        hc_coefficients_backward(dh, grad_post + t * n, grad_res + t * n * n, saved + t * n * width, alpha, n,
                                 hidden, dm, c, dwt + K * hidden);
        hc_dx_row<NT>(xt, g, grad_x_in != nullptr ? grad_x_in + t * n * hidden : nullptr, h_pre + t * n, dm, c,
                      wt.data(), n, hidden, grad_x + t * n * hidden, dwt);
      }
    }
    finish_streaming_stores();
  });
  at::parallel_for(0, hidden, 256, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col)
      for (int k = 0; k < K; ++k) {
        A total = partial[k * hidden + col];
        for (int64_t ch = 1; ch < chunks; ++ch) total += partial[ch * share + k * hidden + col];
        grad_weight[col * K + k] = total;
      }
  });
  A* outputs[4] = {grad_alpha, grad_static_pre, grad_static_post, grad_static_res};
  const int sizes[4] = {3, n, n, n * n};
  int64_t offset = K * hidden;
  for (int part = 0; part < 4; offset += sizes[part], ++part)
    for (int j = 0; j < sizes[part]; ++j) {
      A total = partial[offset + j];
      for (int64_t ch = 1; ch < chunks; ++ch) total += partial[ch * share + offset + j];
      outputs[part][j] = total;
    }
}

Five hc_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                         const at::Tensor& static_pre, const at::Tensor& static_post, const at::Tensor& static_res,
                         double eps) {
  auto outputs = hc_mappings_pre_fwd_outputs(x, weight, alpha, static_pre, static_post, static_res);
  const auto& [layer_input, h_pre, h_post, h_res, saved] = outputs;
  prefer_huge_pages(layer_input);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_hc_mappings_pre_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, hc_mappings_pre_fwd_kernel<NT>(
        x.data_ptr<scalar_t>(), weight.data_ptr<A>(), alpha.data_ptr<A>(), static_pre.data_ptr<A>(),
        static_post.data_ptr<A>(), static_res.data_ptr<A>(), s.tokens, s.n, s.hidden, static_cast<A>(eps),
        layer_input.data_ptr<scalar_t>(), h_pre.data_ptr<A>(), h_post.data_ptr<A>(), h_res.data_ptr<A>(),
        saved.data_ptr<A>()));
  });
  return outputs;
}

Six hc_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                        const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                        const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& h_pre,
                        const at::Tensor& saved) {
  auto outputs = hc_mappings_pre_bwd_outputs(grad_input, grad_pre, grad_post, grad_res, grad_x_in, x, weight, alpha,
                                             h_pre, saved);
  const auto& [grad_x, grad_weight, grad_alpha, grad_static_pre, grad_static_post, grad_static_res] = outputs;
  prefer_huge_pages(grad_x);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_hc_mappings_pre_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, hc_mappings_pre_bwd_kernel<NT>(
        grad_input.data_ptr<scalar_t>(), grad_pre.data_ptr<A>(), grad_post.data_ptr<A>(), grad_res.data_ptr<A>(),
        grad_x_in.has_value() ? grad_x_in->data_ptr<scalar_t>() : nullptr, x.data_ptr<scalar_t>(),
        weight.data_ptr<A>(), alpha.data_ptr<A>(), h_pre.data_ptr<A>(), saved.data_ptr<A>(), s.tokens, s.n,
        s.hidden, grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<A>(), grad_alpha.data_ptr<A>(),
        grad_static_pre.data_ptr<A>(), grad_static_post.data_ptr<A>(), grad_static_res.data_ptr<A>()));
  });
  return outputs;
}

}  // namespace cpu
}  // namespace mhc

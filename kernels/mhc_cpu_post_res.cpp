// CPU kernels of post_res, one pass over the streams of each token (C++, parallel over tokens with
// at::parallel_for). Blocks of whole hardware vectors (cpu_vec.h), per-stream values in registers
// for n known at compile time. Compiled once per instruction-set level (cpu_vec.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_vec.h"

namespace mhc {
namespace cpu {

// ---------------------------------------------------------------- post_res

template <int NT, typename S, typename A>
void post_res_fwd_kernel(const S* x, const S* f, const A* h_post, const A* h_res, S* out, int64_t tokens,
                         int n_rt, int64_t hidden) {
  const int n = NT > 0 ? NT : n_rt;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      const A* hr = h_res + t * n * n;
      for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
        constexpr bool kFull = decltype(full)::value;
        const Vec<A> fb = load_vec<A, kFull>(f + t * hidden + c0, len);
        Vec<A> v[kStreamSlots<NT>];
#pragma GCC unroll 16
        for (int j = 0; j < n; ++j) v[j] = load_vec<A, kFull>(x + o + j * hidden + c0, len);
#pragma GCC unroll 16
        for (int i = 0; i < n; ++i) {
          Vec<A> acc = h_post[t * n + i] * fb;
#pragma GCC unroll 16
          for (int j = 0; j < n; ++j) acc += hr[i * n + j] * v[j];
          store_vec<A, kFull>(acc, len, out + o + i * hidden + c0);
        }
      });
    }
  });
}

// One pass per token: dx[j] = sum_i h_res[i, j] g[i], df = sum_i h_post[i] g[i], and the
// coefficient gradients sum_c g[i] x[j], sum_c g[i] f in vector lanes summed in a fixed order.
template <int NT, typename S, typename A>
void post_res_bwd_kernel(const S* grad_out, const S* x, const S* f, const A* h_post, const A* h_res,
                         S* grad_x, S* grad_f, A* grad_h_post, A* grad_h_res, int64_t tokens, int n_rt,
                         int64_t hidden) {
  const int n = NT > 0 ? NT : n_rt;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      const A* hr = h_res + t * n * n;
      Vec<A> res_lanes[kStreamSlots<NT> * kStreamSlots<NT>] = {};
      Vec<A> post_lanes[kStreamSlots<NT>] = {};
      for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
        constexpr bool kFull = decltype(full)::value;
        const Vec<A> fb = load_vec<A, kFull>(f + t * hidden + c0, len);
        Vec<A> df = {}, g[kStreamSlots<NT>], v[kStreamSlots<NT>];
#pragma GCC unroll 16
        for (int i = 0; i < n; ++i) {
          g[i] = load_vec<A, kFull>(grad_out + o + i * hidden + c0, len);
          v[i] = load_vec<A, kFull>(x + o + i * hidden + c0, len);
        }
#pragma GCC unroll 16
        for (int i = 0; i < n; ++i) {
          df += h_post[t * n + i] * g[i];
          post_lanes[i] += g[i] * fb;
#pragma GCC unroll 16
          for (int j = 0; j < n; ++j) res_lanes[i * n + j] += g[i] * v[j];
        }
#pragma GCC unroll 16
        for (int j = 0; j < n; ++j) {
          Vec<A> dx = {};
#pragma GCC unroll 16
          for (int i = 0; i < n; ++i) dx += hr[i * n + j] * g[i];
          stream_vec<A, kFull>(dx, len, grad_x + o + j * hidden + c0);
        }
        store_vec<A, kFull>(df, len, grad_f + t * hidden + c0);
      });
      for (int k = 0; k < n * n; ++k) grad_h_res[t * n * n + k] = sum_lanes<A>(res_lanes[k]);
      for (int i = 0; i < n; ++i) grad_h_post[t * n + i] = sum_lanes<A>(post_lanes[i]);
    }
    finish_streaming_stores();
  });
}

at::Tensor post_res_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                        const at::Tensor& h_res) {
  auto out = post_res_fwd_output(x, f, h_post, h_res);
  prefer_huge_pages(out);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, post_res_fwd_kernel<NT>(
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), h_post.data_ptr<A>(), h_res.data_ptr<A>(),
        out.data_ptr<scalar_t>(), s.tokens, s.n, s.hidden));
  });
  return out;
}

Four post_res_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f,
                  const at::Tensor& h_post, const at::Tensor& h_res) {
  auto outputs = post_res_bwd_outputs(grad_out, x, f, h_post, h_res);
  at::Tensor& grad_x = std::get<0>(outputs);
  at::Tensor& grad_f = std::get<1>(outputs);
  prefer_huge_pages(grad_x);
  prefer_huge_pages(grad_f);
  at::Tensor& grad_h_post = std::get<2>(outputs);
  at::Tensor& grad_h_res = std::get<3>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, post_res_bwd_kernel<NT>(
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), h_post.data_ptr<A>(),
        h_res.data_ptr<A>(), grad_x.data_ptr<scalar_t>(), grad_f.data_ptr<scalar_t>(),
        grad_h_post.data_ptr<A>(), grad_h_res.data_ptr<A>(), s.tokens, s.n, s.hidden));
  });
  return outputs;
}

}  // namespace cpu
}  // namespace mhc

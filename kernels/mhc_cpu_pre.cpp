// CPU kernels of pre, a token at a time (C++, parallel over tokens with at::parallel_for), with the
// row loops of cpu_stream_rows.h. Compiled once per instruction-set level (cpu_vec.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_stream_rows.h"

namespace mhc {
namespace cpu {

// ---------------------------------------------------------------- pre

template <typename S, typename A>
void pre_fwd_kernel(const S* x, const A* h_pre, S* out, int64_t tokens, int n, int64_t hidden) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      read_streams_row(x + t * n * hidden, h_pre + t * n, n, hidden, out + t * hidden);
  });
}

// Per token: grad_h[i] = sum_c g[c] x[i, c], then grad_x[i] = h_pre[i] g (the token's rows are
// still in cache for the second loop).
template <int NT, typename S, typename A>
void pre_bwd_kernel(const S* grad_out, const S* x, const A* h_pre, S* grad_x, A* grad_h, int64_t tokens,
                    int n_rt, int64_t hidden) {
  const int n = NT > 0 ? NT : n_rt;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const S* g = grad_out + t * hidden;
      stream_dots_row<NT>(x + t * n * hidden, g, n, hidden, grad_h + t * n);
      for (int i = 0; i < n; ++i) {
        const A h = h_pre[t * n + i];
        S* dx = grad_x + (t * n + i) * hidden;
        for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
          constexpr bool kFull = decltype(full)::value;
          store_vec<A, kFull>(h * load_vec<A, kFull>(g + c0, len), len, dx + c0);
        });
      }
    }
  });
}

at::Tensor pre_fwd(const at::Tensor& x, const at::Tensor& h_pre) {
  auto out = pre_fwd_output(x, h_pre);
  prefer_huge_pages(out);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_pre_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    pre_fwd_kernel(x.data_ptr<scalar_t>(), h_pre.data_ptr<A>(), out.data_ptr<scalar_t>(), s.tokens, s.n,
                   s.hidden);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pre_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& h_pre) {
  auto outputs = pre_bwd_outputs(grad_out, x, h_pre);
  at::Tensor& grad_x = std::get<0>(outputs);
  prefer_huge_pages(grad_x);
  at::Tensor& grad_h = std::get<1>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_pre_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, pre_bwd_kernel<NT>(
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), h_pre.data_ptr<A>(),
        grad_x.data_ptr<scalar_t>(), grad_h.data_ptr<A>(), s.tokens, s.n, s.hidden));
  });
  return outputs;
}

}  // namespace cpu
}  // namespace mhc

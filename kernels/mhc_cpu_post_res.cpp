// CPU kernels of post_res, one pass over the streams of each token (C++, parallel over tokens with
// at::parallel_for). Blocks of whole hardware vectors (cpu_vec.h), per-stream values in registers
// for n known at compile time. Compiled once per instruction-set level (cpu_vec.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_stream_rows.h"

namespace mhc {
namespace cpu {

// ---------------------------------------------------------------- post_res

template <int NT, typename S, typename A>
void post_res_fwd_kernel(const S* x, const S* f, const A* h_post, const A* h_res, S* out, int64_t tokens,
                         int n, int64_t hidden) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      post_res_row<NT>(x + t * n * hidden, f + t * hidden, h_post + t * n, h_res + t * n * n, n, hidden,
                       out + t * n * hidden);
  });
}

// The stream gradient is written past the caches: it is read again only after the previous
// sub-layer's backward.
template <int NT, typename S, typename A>
void post_res_bwd_kernel(const S* grad_out, const S* x, const S* f, const A* h_post, const A* h_res,
                         S* grad_x, S* grad_f, A* grad_h_post, A* grad_h_res, int64_t tokens, int n,
                         int64_t hidden) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      post_res_backward_row<NT, true>(grad_out + o, x + o, f + t * hidden, h_post + t * n, h_res + t * n * n, n,
                                      hidden, grad_x + o, grad_f + t * hidden, grad_h_post + t * n,
                                      grad_h_res + t * n * n);
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

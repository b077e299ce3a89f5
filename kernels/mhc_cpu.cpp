// CPU implementations of the mHC ops (C++, parallel over tokens with at::parallel_for, which is
// OpenMP in torch's builds). The per-token math comes from mhc_math.h; this file only tiles the
// loops so the compiler vectorises them (lanes of kLanes values, reduced in a fixed order at the
// end, so results do not depend on the number of threads).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dispatch.h"

namespace mhc {
namespace {

constexpr int kLanes = 16;      // values per vectorised block of a row of C
constexpr int kTokenTile = 16;  // tokens sharing one pass over phi

template <typename A>
A sum_lanes(const A* lanes) {
  A total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Loads `len` <= kLanes values of a row into `out` as A, zero-padding the rest.
template <typename S, typename A>
void load_block(const S* row, int64_t len, A* out) {
  for (int l = 0; l < kLanes; ++l) out[l] = l < len ? static_cast<A>(row[l]) : A(0);
}

// ---------------------------------------------------------------- sinkhorn

// Sinkhorn of up to kMatrices matrices at once: those in the scale domain as SIMD lanes (one
// 64-byte vector of A per entry), the others one at a time in the log domain. Work space of one
// thread; logits, grad, p: n*n*kMatrices values, sums: sinkhorn_scratch_size * kMatrices.
template <typename A>
struct SinkhornGroup {
  static constexpr int kMatrices = 64 / sizeof(A);
  int n, iters;
  std::vector<A> logits, grad, p, sums;
  bool scale[kMatrices];

  SinkhornGroup(int n_, int iters_)
      : n(n_), iters(iters_), logits(n * n * kMatrices), grad(n * n * kMatrices), p(n * n * kMatrices),
        sums(sinkhorn_scratch_size(n, iters) * kMatrices) {}

  // Loads the logits of `count` matrices (matrix b at in + b * ld) into lanes; the lanes of the
  // log-domain matrices and those past `count` get zeros.
  void load(const A* in, int64_t ld, int count) {
    for (int b = 0; b < kMatrices; ++b) scale[b] = b < count && in_scale_domain(in + b * ld, n, 1);
    for (int k = 0; k < n * n; ++k)
      for (int b = 0; b < kMatrices; ++b) logits[k * kMatrices + b] = scale[b] ? in[b * ld + k] : A(0);
  }

  // Sinkhorn matrices of the logits in[b * ld], b < count, into out[b * ld_out].
  void forward(const A* in, int64_t ld, A* out, int64_t ld_out, int count) {
    load(in, ld, count);
    sinkhorn_scale_forward<kMatrices>(logits.data(), n, iters, static_cast<A*>(nullptr));
    for (int b = 0; b < count; ++b) {
      A* o = out + b * ld_out;
      if (scale[b]) {
        for (int k = 0; k < n * n; ++k) o[k] = logits[k * kMatrices + b];
      } else {
        std::copy(in + b * ld, in + b * ld + n * n, o);
        sinkhorn_forward(o, n, iters);
      }
    }
  }

  // Gradients w.r.t. the logits in[b * ld] given the output gradients g[b * ld_g], into
  // out[b * ld_out], b < count.
  void backward(const A* in, int64_t ld, const A* g, int64_t ld_g, A* out, int64_t ld_out, int count) {
    load(in, ld, count);
    for (int k = 0; k < n * n; ++k)
      for (int b = 0; b < kMatrices; ++b) grad[k * kMatrices + b] = scale[b] ? g[b * ld_g + k] : A(0);
    sinkhorn_scale_backward<kMatrices>(logits.data(), grad.data(), n, iters, p.data(), sums.data());
    for (int b = 0; b < count; ++b) {
      A* o = out + b * ld_out;
      if (scale[b]) {
        for (int k = 0; k < n * n; ++k) o[k] = grad[k * kMatrices + b];
      } else {
        sinkhorn_backward(in + b * ld, g + b * ld_g, o, n, iters, p.data(), sums.data());
      }
    }
  }
};

template <typename A>
void sinkhorn_fwd_kernel(const A* logits, A* out, int64_t count, int n, int iters) {
  constexpr int kMatrices = SinkhornGroup<A>::kMatrices;
  const int64_t groups = (count + kMatrices - 1) / kMatrices;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    SinkhornGroup<A> group(n, iters);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i * kMatrices;
      group.forward(logits + t * n * n, n * n, out + t * n * n, n * n,
                    static_cast<int>(std::min<int64_t>(kMatrices, count - t)));
    }
  });
}

template <typename A>
void sinkhorn_bwd_kernel(const A* logits, const A* grad_out, A* grad_in, int64_t count, int n, int iters) {
  constexpr int kMatrices = SinkhornGroup<A>::kMatrices;
  const int64_t groups = (count + kMatrices - 1) / kMatrices;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    SinkhornGroup<A> group(n, iters);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * kMatrices * n * n;
      group.backward(logits + o, n * n, grad_out + o, n * n, grad_in + o, n * n,
                     static_cast<int>(std::min<int64_t>(kMatrices, count - i * kMatrices)));
    }
  });
}

at::Tensor sinkhorn_fwd(const at::Tensor& logits, int64_t iters) {
  auto out = sinkhorn_fwd_outputs(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mhc_sinkhorn_fwd", [&] {
    sinkhorn_fwd_kernel(logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), logits.size(0),
                        logits.size(1), checked_iters(iters));
  });
  return out;
}

at::Tensor sinkhorn_bwd(const at::Tensor& logits, const at::Tensor& grad_out, int64_t iters) {
  auto grad_in = sinkhorn_bwd_outputs(logits, grad_out);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mhc_sinkhorn_bwd", [&] {
    sinkhorn_bwd_kernel(logits.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                        grad_in.data_ptr<scalar_t>(), logits.size(0), logits.size(1), checked_iters(iters));
  });
  return grad_in;
}

// ---------------------------------------------------------------- mappings

// The three products of mappings are GEMM-shaped with one small side (K = n^2 + 2n columns): the
// micro-kernels below keep their accumulators in vector registers (blocks of whole vectors of A,
// sizes fixed at compile time) and read the large side (v, dx) once, as contiguous rows.
template <typename A>
constexpr int kVec = 64 / sizeof(A);  // values of A in one 64-byte vector

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Forward: m[b, c] = sum_e v[b, e] * phi[e, c] for kProjectTokens tokens and 2 vectors of columns
// c of phi_pad (rows of ld values, zero-padded past K), into m[b * ld + c].
constexpr int kProjectTokens = 8;

template <typename S, typename A>
void project_block(const S* const* rows, int64_t width, const A* phi_pad, int64_t ld, A* m) {
  constexpr int kCols = 2 * kVec<A>;
  A acc[kProjectTokens][kCols] = {};
  for (int64_t e = 0; e < width; ++e) {
    const A* p = phi_pad + e * ld;
    for (int b = 0; b < kProjectTokens; ++b) {
      const A v = static_cast<A>(rows[b][e]);
      for (int c = 0; c < kCols; ++c) acc[b][c] += v * p[c];
    }
  }
  for (int b = 0; b < kProjectTokens; ++b) std::copy(acc[b], acc[b] + kCols, m + b * ld);
}

// sum(v^2) of one row, in kVec lanes summed in a fixed order.
template <typename S, typename A>
A sum_squares(const S* row, int64_t width) {
  A lanes[kVec<A>] = {};
  int64_t e = 0;
  for (; e + kVec<A> <= width; e += kVec<A>)
    for (int l = 0; l < kVec<A>; ++l) {
      const A v = static_cast<A>(row[e + l]);
      lanes[l] += v * v;
    }
  for (int l = 0; e + l < width; ++l) {
    const A v = static_cast<A>(row[e + l]);
    lanes[l] += v * v;
  }
  A total = 0;
  for (int l = 0; l < kVec<A>; ++l) total += lanes[l];
  return total;
}

// Per block of kProjectTokens tokens: m = v @ phi and sum(v^2) (the rows stay in cache between
// the two), then the gates per token and the Sinkhorn of the block's matrices in SIMD groups.
template <typename S, typename A>
void mappings_fwd_kernel(const S* x, const A* phi, const A* alpha, const A* bias, int64_t tokens, int n,
                         int64_t hidden, int iters, A eps, A* h_pre, A* h_post, A* h_res, A* saved) {
  const int K = num_columns(n);
  const int64_t ld = round_up(K, 2 * kVec<A>);
  const int64_t width = n * hidden;
  std::vector<A> phi_pad(width * ld, A(0));
  at::parallel_for(0, width, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) std::copy(phi + e * K, phi + (e + 1) * K, phi_pad.data() + e * ld);
  });
  constexpr int kBlock = std::max(kProjectTokens, SinkhornGroup<A>::kMatrices);
  at::parallel_for(0, (tokens + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> m(kBlock * ld), z(kBlock * K);
    SinkhornGroup<A> group(n, iters);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t0 = block * kBlock;
      const int valid = static_cast<int>(std::min<int64_t>(kBlock, tokens - t0));
      for (int b0 = 0; b0 < valid; b0 += kProjectTokens) {
        const S* rows[kProjectTokens];
        for (int b = 0; b < kProjectTokens; ++b) rows[b] = x + (t0 + std::min(b0 + b, valid - 1)) * width;
        for (int64_t c0 = 0; c0 < K; c0 += 2 * kVec<A>)
          project_block(rows, width, phi_pad.data() + c0, ld, m.data() + b0 * ld + c0);
      }
      for (int b = 0; b < valid; ++b) {
        const int64_t t = t0 + b;
        const A inv_r = inverse_rms(sum_squares<S, A>(x + t * width, width), width, eps);
        A* u = saved + t * (K + 1);
        for (int k = 0; k < K; ++k) u[k] = m[b * ld + k] * inv_r;
        u[K] = inv_r;
        mappings_gates(u, alpha, bias, n, z.data() + b * K, h_pre + t * n, h_post + t * n);
      }
      for (int b = 0; b < valid; b += group.kMatrices)
        group.forward(z.data() + b * K + 2 * n, K, h_res + (t0 + b) * n * n, n * n,
                      std::min(group.kMatrices, valid - b));
    }
  });
}

// Backward, dx = dm @ phi^T + c * v for kDxTokens tokens (dm rows of ldm values) and kDxWidth
// values of their rows from e0 (`len` of them; kFull: all). phi_t [K, ldt] is phi transposed.
constexpr int kDxTokens = 4;

template <bool kFull, typename S, typename A>
void dx_block(const S* x, S* grad_x, int64_t width, int valid, const A* dm, int64_t ldm, const A* rms_term,
              const A* phi_t, int64_t ldt, int K, int64_t e0, int len) {
  constexpr int kWidth = 4 * kVec<A>;
  A acc[kDxTokens][kWidth];
  for (int b = 0; b < kDxTokens; ++b) {
    const S* v = x + std::min(b, valid - 1) * width + e0;
    for (int l = 0; l < kWidth; ++l)
      acc[b][l] = rms_term[std::min(b, valid - 1)] * (kFull || l < len ? static_cast<A>(v[l]) : A(0));
  }
  for (int k = 0; k < K; ++k) {
    const A* p = phi_t + k * ldt + e0;
    for (int b = 0; b < kDxTokens; ++b) {
      const A d = dm[std::min(b, valid - 1) * ldm + k];
      for (int l = 0; l < kWidth; ++l) acc[b][l] += d * p[l];
    }
  }
  for (int b = 0; b < valid; ++b)
    for (int l = 0; l < (kFull ? kWidth : len); ++l) grad_x[b * width + e0 + l] = static_cast<S>(acc[b][l]);
}

// Backward, the share of a token range in dphi: part[k, e] += sum_t v[t, e] * dm_pad[t, k] for
// kDphiCols columns k from k0 and kDphiWidth values e from e0 (`len` of them; kFull: all).
constexpr int kDphiCols = 8;

template <bool kFull, typename S, typename A>
void dphi_block(const S* x, int64_t width, int64_t t_begin, int64_t t_end, const A* dm_pad, int64_t ldm,
                int k0, int64_t e0, int len, A* part, int64_t ldp) {
  constexpr int kWidth = 2 * kVec<A>;
  A acc[kDphiCols][kWidth] = {};
  for (int64_t t = t_begin; t < t_end; ++t) {
    const S* row = x + t * width + e0;
    A v[kWidth];
    for (int l = 0; l < kWidth; ++l) v[l] = kFull || l < len ? static_cast<A>(row[l]) : A(0);
    const A* d = dm_pad + t * ldm + k0;
    for (int j = 0; j < kDphiCols; ++j)
      for (int l = 0; l < kWidth; ++l) acc[j][l] += d[j] * v[l];
  }
  for (int j = 0; j < kDphiCols; ++j)
    for (int l = 0; l < kWidth; ++l) part[(k0 + j) * ldp + e0 + l] = acc[j][l];
}

// Backward: (1) per SIMD group of tokens the coefficient gradients (dz, dm, c); (2) dx, blocks of
// kDxTokens tokens x kDxWidth values; (3) dphi = v^T dm in fixed token chunks (reduction_chunks:
// shapes only, never threads), each chunk's partial [K, width] computed in register blocks, then
// the chunks summed in order, like dbias and dalpha: bit-identical results run to run.
template <typename S, typename A>
void mappings_bwd_kernel(const A* grad_pre, const A* grad_post, const A* grad_res, const S* x,
                         const A* phi, const A* alpha, const A* bias, const A* saved, int64_t tokens,
                         int n, int64_t hidden, int iters, S* grad_x, A* grad_phi, A* grad_alpha,
                         A* grad_bias) {
  const int K = num_columns(n);
  const int KZ = K + 3;  // dz, then the three dalpha terms
  const int64_t ldm = round_up(K, kDphiCols);
  const int64_t width = n * hidden;

  std::vector<A> dm_pad(tokens * ldm, A(0)), dz(tokens * KZ), rms_term(tokens);
  constexpr int kMatrices = SinkhornGroup<A>::kMatrices;
  at::parallel_for(0, (tokens + kMatrices - 1) / kMatrices, 1, [&](int64_t begin, int64_t end) {
    SinkhornGroup<A> group(n, iters);
    std::vector<A> z(kMatrices * K);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t0 = i * kMatrices;
      const int count = static_cast<int>(std::min<int64_t>(kMatrices, tokens - t0));
      for (int b = 0; b < count; ++b) {
        const int64_t t = t0 + b;
        mappings_gates_backward(grad_pre + t * n, grad_post + t * n, saved + t * (K + 1), alpha, bias, n,
                                z.data() + b * K, dz.data() + t * KZ);
      }
      group.backward(z.data() + 2 * n, K, grad_res + t0 * n * n, n * n, dz.data() + t0 * KZ + 2 * n, KZ, count);
      for (int b = 0; b < count; ++b) {
        const int64_t t = t0 + b;
        const A* u = saved + t * (K + 1);
        A* dzt = dz.data() + t * KZ;
        rms_term[t] = mappings_projection_backward(dzt, u, u[K], alpha, n, width, dzt + K, dm_pad.data() + t * ldm);
      }
    }
  });

  // dx: phi^T [K, ldt] so that the loop runs along the rows of v.
  constexpr int kDxWidth = 4 * kVec<A>;
  const int64_t ldt = round_up(width, kDxWidth);
  std::vector<A> phi_t(K * ldt, A(0));
  at::parallel_for(0, width, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      for (int k = 0; k < K; ++k) phi_t[k * ldt + e] = phi[e * K + k];
  });
  at::parallel_for(0, (tokens + kDxTokens - 1) / kDxTokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t t0 = block * kDxTokens;
      const int valid = static_cast<int>(std::min<int64_t>(kDxTokens, tokens - t0));
      const S* xs = x + t0 * width;
      S* dxs = grad_x + t0 * width;
      int64_t e0 = 0;
      for (; e0 + kDxWidth <= width; e0 += kDxWidth)
        dx_block<true>(xs, dxs, width, valid, dm_pad.data() + t0 * ldm, ldm, rms_term.data() + t0, phi_t.data(), ldt, K, e0, kDxWidth);
      if (e0 < width)
        dx_block<false>(xs, dxs, width, valid, dm_pad.data() + t0 * ldm, ldm, rms_term.data() + t0, phi_t.data(), ldt, K, e0,
                        static_cast<int>(width - e0));
    }
  });

  // dphi: partials [chunks][ldm][ldp], a task per (chunk, block of kDphiWidth values of e).
  constexpr int kDphiWidth = 2 * kVec<A>;
  const int64_t ldp = round_up(width, kDphiWidth);
  const int64_t e_blocks = ldp / kDphiWidth;
  const int64_t chunks = reduction_chunks(tokens, width * K);
  const int64_t chunk = (tokens + chunks - 1) / chunks;
  std::vector<A> partial(chunks * ldm * ldp);
  at::parallel_for(0, chunks * e_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / e_blocks, e0 = task % e_blocks * kDphiWidth;
      const int64_t t_begin = c * chunk, t_end = std::min(tokens, t_begin + chunk);
      A* part = partial.data() + c * ldm * ldp;
      for (int k0 = 0; k0 < K; k0 += kDphiCols) {
        if (e0 + kDphiWidth <= width)
          dphi_block<true>(x, width, t_begin, t_end, dm_pad.data(), ldm, k0, e0, kDphiWidth, part, ldp);
        else
          dphi_block<false>(x, width, t_begin, t_end, dm_pad.data(), ldm, k0, e0, static_cast<int>(width - e0), part, ldp);
      }
    }
  });
  at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      for (int k = 0; k < K; ++k) {
        A total = 0;
        for (int64_t c = 0; c < chunks; ++c) total += partial[(c * ldm + k) * ldp + e];
        grad_phi[e * K + k] = total;
      }
  });
  for (int k = 0; k < KZ; ++k) {
    A total = 0;
    for (int64_t t = 0; t < tokens; ++t) total += dz[t * KZ + k];
    if (k < K) grad_bias[k] = total;
    else grad_alpha[k - K] = total;
  }
}

Four mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                  const at::Tensor& bias, int64_t iters, double eps) {
  auto outputs = mappings_fwd_outputs(x, phi, alpha, bias);
  at::Tensor& h_pre = std::get<0>(outputs);
  at::Tensor& h_post = std::get<1>(outputs);
  at::Tensor& h_res = std::get<2>(outputs);
  at::Tensor& saved = std::get<3>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    mappings_fwd_kernel(x.data_ptr<scalar_t>(), phi.data_ptr<A>(), alpha.data_ptr<A>(), bias.data_ptr<A>(),
                        s.tokens, s.n, s.hidden, checked_iters(iters), static_cast<A>(eps), h_pre.data_ptr<A>(),
                        h_post.data_ptr<A>(), h_res.data_ptr<A>(), saved.data_ptr<A>());
  });
  return outputs;
}

Four mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                  const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  const at::Tensor& saved, int64_t iters) {
  auto outputs = mappings_bwd_outputs(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved);
  at::Tensor& grad_x = std::get<0>(outputs);
  at::Tensor& grad_phi = std::get<1>(outputs);
  at::Tensor& grad_alpha = std::get<2>(outputs);
  at::Tensor& grad_bias = std::get<3>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    mappings_bwd_kernel(grad_pre.data_ptr<A>(), grad_post.data_ptr<A>(), grad_res.data_ptr<A>(),
                        x.data_ptr<scalar_t>(), phi.data_ptr<A>(), alpha.data_ptr<A>(), bias.data_ptr<A>(),
                        saved.data_ptr<A>(), s.tokens, s.n, s.hidden, checked_iters(iters),
                        grad_x.data_ptr<scalar_t>(), grad_phi.data_ptr<A>(), grad_alpha.data_ptr<A>(),
                        grad_bias.data_ptr<A>());
  });
  return outputs;
}

// ---------------------------------------------------------------- pre

template <typename S, typename A>
void pre_fwd_kernel(const S* x, const A* h_pre, S* out, int64_t tokens, int n, int64_t hidden) {
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const S* xt = x + t * n * hidden;
      for (int64_t c0 = 0; c0 < hidden; c0 += kLanes) {
        const int64_t len = std::min<int64_t>(kLanes, hidden - c0);
        A acc[kLanes] = {};
        for (int i = 0; i < n; ++i) {
          A v[kLanes];
          load_block(xt + i * hidden + c0, len, v);
          const A h = h_pre[t * n + i];
          for (int l = 0; l < kLanes; ++l) acc[l] += h * v[l];
        }
        for (int64_t l = 0; l < len; ++l) out[t * hidden + c0 + l] = static_cast<S>(acc[l]);
      }
    }
  });
}

template <typename S, typename A>
void pre_bwd_kernel(const S* grad_out, const S* x, const A* h_pre, S* grad_x, A* grad_h, int64_t tokens,
                    int n, int64_t hidden) {
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    A lanes[kMaxStreams][kLanes];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      for (int i = 0; i < n; ++i) std::fill(lanes[i], lanes[i] + kLanes, A(0));
      for (int64_t c0 = 0; c0 < hidden; c0 += kLanes) {
        const int64_t len = std::min<int64_t>(kLanes, hidden - c0);
        A g[kLanes];
        load_block(grad_out + t * hidden + c0, len, g);
        for (int i = 0; i < n; ++i) {
          A v[kLanes];
          load_block(x + o + i * hidden + c0, len, v);
          const A h = h_pre[t * n + i];
          for (int l = 0; l < kLanes; ++l) lanes[i][l] += g[l] * v[l];
          for (int64_t l = 0; l < len; ++l) grad_x[o + i * hidden + c0 + l] = static_cast<S>(h * g[l]);
        }
      }
      for (int i = 0; i < n; ++i) grad_h[t * n + i] = sum_lanes(lanes[i]);
    }
  });
}

at::Tensor pre_fwd(const at::Tensor& x, const at::Tensor& h_pre) {
  auto out = pre_fwd_output(x, h_pre);
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
  at::Tensor& grad_h = std::get<1>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_pre_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    pre_bwd_kernel(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), h_pre.data_ptr<A>(),
                   grad_x.data_ptr<scalar_t>(), grad_h.data_ptr<A>(), s.tokens, s.n, s.hidden);
  });
  return outputs;
}

// ---------------------------------------------------------------- post_res

template <typename S, typename A>
void post_res_fwd_kernel(const S* x, const S* f, const A* h_post, const A* h_res, S* out, int64_t tokens,
                         int n, int64_t hidden) {
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    A v[kMaxStreams][kLanes];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      const A* hr = h_res + t * n * n;
      for (int64_t c0 = 0; c0 < hidden; c0 += kLanes) {
        const int64_t len = std::min<int64_t>(kLanes, hidden - c0);
        A fb[kLanes];
        load_block(f + t * hidden + c0, len, fb);
        for (int j = 0; j < n; ++j) load_block(x + o + j * hidden + c0, len, v[j]);
        for (int i = 0; i < n; ++i) {
          A acc[kLanes];
          const A hp = h_post[t * n + i];
          for (int l = 0; l < kLanes; ++l) acc[l] = hp * fb[l];
          for (int j = 0; j < n; ++j) {
            const A h = hr[i * n + j];
            for (int l = 0; l < kLanes; ++l) acc[l] += h * v[j][l];
          }
          for (int64_t l = 0; l < len; ++l) out[o + i * hidden + c0 + l] = static_cast<S>(acc[l]);
        }
      }
    }
  });
}

template <typename S, typename A>
void post_res_bwd_kernel(const S* grad_out, const S* x, const S* f, const A* h_post, const A* h_res,
                         S* grad_x, S* grad_f, A* grad_h_post, A* grad_h_res, int64_t tokens, int n,
                         int64_t hidden) {
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<A> lanes_store((n * n + n) * kLanes);
    A g[kMaxStreams][kLanes], v[kMaxStreams][kLanes];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * n * hidden;
      const A* hr = h_res + t * n * n;
      A* res_lanes = lanes_store.data();             // [n*n][kLanes]: sum_c g[i] x[j]
      A* post_lanes = res_lanes + n * n * kLanes;    // [n][kLanes]:   sum_c g[i] f
      std::fill(lanes_store.begin(), lanes_store.end(), A(0));
      for (int64_t c0 = 0; c0 < hidden; c0 += kLanes) {
        const int64_t len = std::min<int64_t>(kLanes, hidden - c0);
        A fb[kLanes], df[kLanes] = {};
        load_block(f + t * hidden + c0, len, fb);
        for (int i = 0; i < n; ++i) {
          load_block(grad_out + o + i * hidden + c0, len, g[i]);
          load_block(x + o + i * hidden + c0, len, v[i]);
        }
        for (int i = 0; i < n; ++i) {
          const A hp = h_post[t * n + i];
          for (int l = 0; l < kLanes; ++l) {
            df[l] += hp * g[i][l];
            post_lanes[i * kLanes + l] += g[i][l] * fb[l];
          }
          for (int j = 0; j < n; ++j)
            for (int l = 0; l < kLanes; ++l) res_lanes[(i * n + j) * kLanes + l] += g[i][l] * v[j][l];
        }
        for (int j = 0; j < n; ++j) {
          A dx[kLanes] = {};
          for (int i = 0; i < n; ++i) {
            const A h = hr[i * n + j];
            for (int l = 0; l < kLanes; ++l) dx[l] += h * g[i][l];
          }
          for (int64_t l = 0; l < len; ++l) grad_x[o + j * hidden + c0 + l] = static_cast<S>(dx[l]);
        }
        for (int64_t l = 0; l < len; ++l) grad_f[t * hidden + c0 + l] = static_cast<S>(df[l]);
      }
      for (int k = 0; k < n * n; ++k) grad_h_res[t * n * n + k] = sum_lanes(res_lanes + k * kLanes);
      for (int i = 0; i < n; ++i) grad_h_post[t * n + i] = sum_lanes(post_lanes + i * kLanes);
    }
  });
}

at::Tensor post_res_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                        const at::Tensor& h_res) {
  auto out = post_res_fwd_output(x, f, h_post, h_res);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    post_res_fwd_kernel(x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), h_post.data_ptr<A>(),
                        h_res.data_ptr<A>(), out.data_ptr<scalar_t>(), s.tokens, s.n, s.hidden);
  });
  return out;
}

Four post_res_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f,
                  const at::Tensor& h_post, const at::Tensor& h_res) {
  auto outputs = post_res_bwd_outputs(grad_out, x, f, h_post, h_res);
  at::Tensor& grad_x = std::get<0>(outputs);
  at::Tensor& grad_f = std::get<1>(outputs);
  at::Tensor& grad_h_post = std::get<2>(outputs);
  at::Tensor& grad_h_res = std::get<3>(outputs);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    post_res_bwd_kernel(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(),
                        h_post.data_ptr<A>(), h_res.data_ptr<A>(), grad_x.data_ptr<scalar_t>(),
                        grad_f.data_ptr<scalar_t>(), grad_h_post.data_ptr<A>(),
                        grad_h_res.data_ptr<A>(), s.tokens, s.n, s.hidden);
  });
  return outputs;
}

}  // namespace
}  // namespace mhc

TORCH_LIBRARY_IMPL(mhc_megatron, CPU, m) {
  m.impl("sinkhorn_fwd", &mhc::sinkhorn_fwd);
  m.impl("sinkhorn_bwd", &mhc::sinkhorn_bwd);
  m.impl("mappings_fwd", &mhc::mappings_fwd);
  m.impl("mappings_bwd", &mhc::mappings_bwd);
  m.impl("pre_fwd", &mhc::pre_fwd);
  m.impl("pre_bwd", &mhc::pre_bwd);
  m.impl("post_res_fwd", &mhc::post_res_fwd);
  m.impl("post_res_bwd", &mhc::post_res_bwd);
}

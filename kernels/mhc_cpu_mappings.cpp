// CPU kernels of sinkhorn and mappings (C++, parallel over tokens with at::parallel_for, which is
// OpenMP in torch's builds). The per-token math comes from mhc_math.h; this file only tiles the
// loops so the compiler vectorises them (blocks of whole hardware vectors, cpu_vec.h, accumulators
// kept in registers, partial sums reduced in a fixed order, so results do not depend on the number
// of threads). Compiled once per instruction-set level (cpu_vec.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_stream_rows.h"

namespace mhc {
namespace cpu {

// ---------------------------------------------------------------- sinkhorn

// Sinkhorn of up to kMatrices matrices at once: those in the scale domain as SIMD lanes (one
// vector of A per entry), the others one at a time in the log domain. Work space of one thread.
template <typename A>
struct SinkhornGroup {
  static constexpr int kMatrices = kVec<A>;
  int n, iters;
  std::vector<Vec<A>> logits, grad, p, sums;  // n*n entries, sums: sinkhorn_scratch_size
  std::vector<A> log_work, log_sums;           // one matrix in the log domain
  bool scale[kMatrices];

  SinkhornGroup(int n_, int iters_)
      : n(n_), iters(iters_), logits(n * n), grad(n * n), p(n * n), sums(sinkhorn_scratch_size(n, iters)),
        log_work(n * n), log_sums(sinkhorn_scratch_size(n, iters)) {}

  // Loads the logits of `count` matrices (matrix b at in + b * ld) into lanes; the lanes of the
  // log-domain matrices and those past `count` get zeros.
  void load(const A* in, int64_t ld, int count) {
    for (int b = 0; b < kMatrices; ++b) scale[b] = b < count && in_scale_domain(in + b * ld, n, 1);
    for (int k = 0; k < n * n; ++k)
      for (int b = 0; b < kMatrices; ++b) logits[k][b] = scale[b] ? in[b * ld + k] : A(0);
  }

  // Sinkhorn matrices of the logits in[b * ld], b < count, into out[b * ld_out].
  void forward(const A* in, int64_t ld, A* out, int64_t ld_out, int count) {
    load(in, ld, count);
    sinkhorn_scale_forward<A>(logits.data(), n, iters, static_cast<Vec<A>*>(nullptr));
    for (int b = 0; b < count; ++b) {
      A* o = out + b * ld_out;
      if (scale[b]) {
        for (int k = 0; k < n * n; ++k) o[k] = logits[k][b];
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
      for (int b = 0; b < kMatrices; ++b) grad[k][b] = scale[b] ? g[b * ld_g + k] : A(0);
    sinkhorn_scale_backward<A>(logits.data(), grad.data(), n, iters, p.data(), sums.data());
    for (int b = 0; b < count; ++b) {
      A* o = out + b * ld_out;
      if (scale[b]) {
        for (int k = 0; k < n * n; ++k) o[k] = grad[k][b];
      } else {
        sinkhorn_backward(in + b * ld, g + b * ld_g, o, n, iters, log_work.data(), log_sums.data());
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
// sizes fixed at compile time) and read the large side (v, dx) as contiguous rows.

// Forward: m[b, c] = sum_e v[b, e] * phi[e, c] for kProjectTokens tokens and the columns c of
// phi_pad (rows of ld values, zero-padded past K) in one vector and one `Tail` (a vector, or half of
// one for the last 1.5 vectors of columns), into m[b * ld + c]. Each column sums its products in
// the order of e whatever vector holds it: the tail's width changes no value.
constexpr int kProjectTokens = 8;

template <typename S, typename A, typename Tail>
void project_block(const S* const* rows, int64_t width, const A* phi_pad, int64_t ld, A* m) {
  Vec<A> acc[kProjectTokens] = {};
  Tail tail[kProjectTokens] = {};
  for (int64_t e = 0; e < width; ++e) {
    Vec<A> p0;
    Tail p1;
    std::memcpy(&p0, phi_pad + e * ld, sizeof(p0));
    std::memcpy(&p1, phi_pad + e * ld + kVec<A>, sizeof(p1));
#pragma GCC unroll 16
    for (int b = 0; b < kProjectTokens; ++b) {
      const A v = static_cast<A>(rows[b][e]);
      acc[b] += v * p0;
      tail[b] += v * p1;
    }
  }
  for (int b = 0; b < kProjectTokens; ++b) {
    std::memcpy(m + b * ld, &acc[b], sizeof(acc[b]));
    std::memcpy(m + b * ld + kVec<A>, &tail[b], sizeof(tail[b]));
  }
}

// m = v @ phi for kProjectTokens tokens and all K columns, two vectors of columns at a time; the
// last 1.5 vectors or fewer with a half-vector tail (where a half vector holds 4 values or more).
template <typename S, typename A>
void project_tokens(const S* const* rows, int64_t width, const A* phi_pad, int64_t ld, int K, A* m) {
  for (int64_t c0 = 0; c0 < K; c0 += 2 * kVec<A>) {
    if constexpr (kVec<A> >= 8) {
      if (K - c0 <= kVec<A> + kVec<A> / 2) {
        project_block<S, A, HalfVec<A>>(rows, width, phi_pad + c0, ld, m + c0);
        continue;
      }
    }
    project_block<S, A, Vec<A>>(rows, width, phi_pad + c0, ld, m + c0);
  }
}

// sum(v^2) of one row: four vectors of lanes in turn (four chains of FMAs, not one: the row comes
// from the cache), the rest into the first; the lanes summed in a fixed order.
template <typename S, typename A>
A sum_squares(const S* row, int64_t width) {
  constexpr int kChains = 4;
  Vec<A> lanes[kChains] = {};
  int64_t e0 = 0;
  for (; e0 + kChains * kVec<A> <= width; e0 += kChains * kVec<A>)
#pragma GCC unroll 4
    for (int j = 0; j < kChains; ++j) {
      const Vec<A> v = load_vec<A, true>(row + e0 + j * kVec<A>, kVec<A>);
      lanes[j] += v * v;
    }
  for_blocks<kVec<A>>(width - e0, [&](int64_t c0, int len, auto full) {
    const Vec<A> v = load_vec<A, decltype(full)::value>(row + e0 + c0, len);
    lanes[0] += v * v;
  });
  return sum_lanes<A>((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
}

// The arguments of post_res in post_res_mappings_pre (per token, as post_res takes them: x [T, n, C],
// f [T, C], h_post [T, n], h_res [T, n, n]), from the tensors (x, f, h_post, h_res).
template <typename S, typename A>
struct PostResInputs {
  const S* x;
  const S* f;
  const A* h_post;
  const A* h_res;

  static PostResInputs of(const Four& tensors) {
    const auto& [x, f, h_post, h_res] = tensors;
    return {x.data_ptr<S>(), f.data_ptr<S>(), h_post.data_ptr<A>(), h_res.data_ptr<A>()};
  }
};

// post_res_mappings_pre's first half: the streams the mappings read are post_res's output `out`
// [T, n, C] = post_res(in).
template <typename S, typename A>
struct PostResForward {
  PostResInputs<S, A> in;
  S* out;
};

// Per block of kProjectTokens tokens: m = v @ phi and sum(v^2) (the rows stay in cache between
// the two), then the gates per token and the Sinkhorn of the block's matrices in SIMD groups.
// With `layer_input` (mappings_pre), also the sub-layer input h_pre x of each token of the block
// while its rows are still in cache: one read of the streams for both ops. With `post_res`
// (post_res_mappings_pre; then x is post_res->out), each block's streams are first computed by
// post_res into x, and read by the mappings from the cache.
template <typename S, typename A>
void mappings_fwd_kernel(const S* x, const A* phi, const A* alpha, const A* bias, int64_t tokens, int n,
                         int64_t hidden, int iters, A eps, A* h_pre, A* h_post, A* h_res, A* saved,
                         S* layer_input, const PostResForward<S, A>* post_res = nullptr) {
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
      if (post_res != nullptr)
        for (int64_t t = t0; t < t0 + valid; ++t)
          MHC_DISPATCH_STREAMS(n, NT, post_res_row<NT>(post_res->in.x + t * width, post_res->in.f + t * hidden,
                                                       post_res->in.h_post + t * n, post_res->in.h_res + t * n * n,
                                                       n, hidden, post_res->out + t * width));
      for (int b0 = 0; b0 < valid; b0 += kProjectTokens) {
        const S* rows[kProjectTokens];
        for (int b = 0; b < kProjectTokens; ++b) rows[b] = x + (t0 + std::min(b0 + b, valid - 1)) * width;
        project_tokens(rows, width, phi_pad.data(), ld, K, m.data() + b0 * ld);
      }
      for (int b = 0; b < valid; ++b) {
        const int64_t t = t0 + b;
        const A inv_r = inverse_rms(sum_squares<S, A>(x + t * width, width), width, eps);
        A* u = saved + t * (K + 1);
        for (int k = 0; k < K; ++k) u[k] = m[b * ld + k] * inv_r;
        u[K] = inv_r;
        mappings_gates(u, alpha, bias, n, z.data() + b * K, h_pre + t * n, h_post + t * n);
        if (layer_input != nullptr)
          read_streams_row(x + t * width, h_pre + t * n, n, hidden, layer_input + t * hidden);
      }
      for (int b = 0; b < valid; b += group.kMatrices)
        group.forward(z.data() + b * K + 2 * n, K, h_res + (t0 + b) * n * n, n * n,
                      std::min(group.kMatrices, valid - b));
    }
  });
}

// Backward, per kDxTokens tokens and one vector of values e0 + [0, len) of stream i (kFull: all),
// e0 = i * hidden + c0, in the tokens' rows of `width` values of x and grad_x:
//   dx = dm @ phi^T + c * v                       (mappings)
//      + h_pre[i] * grad_input                    (mappings_pre: pre's share, stream i)
//      + grad_x_in                                (mappings_pre: the gradient from elsewhere)
// written once; and, while those values of v are in registers, the tokens' share of dphi^T,
// part[k, e] += sum_b dm[b, k] * v[b, e], added to their chunk's partial (`first`: the chunk's first
// tokens, stored instead): one read of the streams for both. dm_t [K][kDxTokens] is the tokens' dm
// transposed (zeros past `valid`), read at fixed offsets from one pointer per step of k. phi_t and
// part are in `ColumnBlocks` layout: the K vectors of the call's block follow each other (one
// contiguous run per call, not K rows a page apart). The terms a call does not have are nullptr.
// v and dx of each token, and 3 more, in registers; a block never passes its SIMD group (kVec<A> tokens).
template <typename A>
constexpr int kDxTokens = std::min(kVectorRegisters / 4, kVec<A>);

// Asks for rows[b * ld] for b in [0, count) to be brought into L2 (a hint: no fault, no effect on values).
template <typename T>
inline void prefetch_rows(const T* rows, int64_t ld, int count) {
  for (int b = 0; b < count; ++b) __builtin_prefetch(rows + b * ld, 0, 2);
}

// The layout of phi^T and of the dphi partials in backward: per stream, its columns c in blocks of
// kVec<A> (the last zero-padded), and per block the K vectors of the block, k after k:
// [n][per_stream(hidden)][K][kVec<A>]. offset() is where the block of columns c0 + [0, kVec<A>) of
// a stream starts (c0 a multiple of kVec<A>).
template <typename A>
struct ColumnBlocks {
  static int64_t per_stream(int64_t hidden) { return (hidden + kVec<A> - 1) / kVec<A>; }
  static int64_t size(int n, int64_t hidden, int K) { return n * per_stream(hidden) * K * kVec<A>; }
  static int64_t offset(int64_t hidden, int K, int stream, int64_t c0) {
    return (stream * per_stream(hidden) + c0 / kVec<A>) * K * kVec<A>;
  }
};

template <typename S, typename A>
struct DxRows {
  const S* x;          // [tokens, width] from the block's first token
  S* grad_x;           // likewise
  const S* grad_x_in;  // likewise, or nullptr
  const S* grad_input; // [tokens, hidden], or nullptr
  const A* h_pre;      // [tokens, n] (with grad_input)
  const A* dm_t;       // [K][kDxTokens]
  const A* rms_term;   // [tokens]
  int64_t width, hidden;
  int n, valid;
};

template <bool kFull, bool kStreamDx, typename S, typename A>
void dx_dphi_block(const DxRows<S, A>& r, const A* phi_t, int K, int stream, int64_t c0, int len, bool first,
                   A* part) {
  const int64_t e0 = stream * r.hidden + c0;
  const int64_t block = ColumnBlocks<A>::offset(r.hidden, K, stream, c0);
  Vec<A> v[kDxTokens<A>], acc[kDxTokens<A>];
#pragma GCC unroll 16
  for (int b = 0; b < kDxTokens<A>; ++b) {
    const int row = std::min(b, r.valid - 1);  // rows past `valid` repeat the last; their dm is 0
    const int64_t e = row * r.width + e0;
    v[b] = load_vec<A, kFull>(r.x + e, len);
    acc[b] = r.rms_term[row] * v[b];
    if (r.grad_x_in != nullptr) acc[b] += load_vec<A, kFull>(r.grad_x_in + e, len);
    if (r.grad_input != nullptr)
      acc[b] += r.h_pre[row * r.n + stream] * load_vec<A, kFull>(r.grad_input + row * r.hidden + c0, len);
  }
  const A* dm = r.dm_t;
  const A* p_row = phi_t + block;
  A* part_row = part + block;
  for (int k = 0; k < K; ++k, dm += kDxTokens<A>, p_row += kVec<A>, part_row += kVec<A>) {
    const Vec<A> p = load_vec<A, true>(p_row, kVec<A>);
    Vec<A> even = first ? Vec<A>{} : load_vec<A, true>(part_row, kVec<A>), odd;  // two chains of FMAs, not one
#pragma GCC unroll 16
    for (int b = 0; b < kDxTokens<A>; ++b) {
      const A d = dm[b];
      acc[b] += d * p;
      if (b % 2 == 0) even += d * v[b];
      else odd = b == 1 ? d * v[b] : odd + d * v[b];
    }
    store_vec<A, true>(even + odd, kVec<A>, part_row);
  }
  for (int b = 0; b < r.valid; ++b) {
    if constexpr (kStreamDx) stream_vec<A, kFull>(acc[b], len, r.grad_x + b * r.width + e0);
    else store_vec<A, kFull>(acc[b], len, r.grad_x + b * r.width + e0);
  }
}

// post_res_mappings_pre's second half in backward: post_res's gradients (as post_res_bwd returns
// them) given the gradient of its output, which the mappings' backward computes a SIMD group of
// tokens at a time into a buffer of the thread that stays in cache.
template <typename S, typename A>
struct PostResBackward {
  PostResInputs<S, A> in;
  S* grad_x;
  S* grad_f;
  A* grad_h_post;
  A* grad_h_res;
};

// Backward of mappings, and of mappings_pre when `grad_input` is given (then h_pre too, and
// optionally grad_x_in, a stream gradient to add), and of post_res_mappings_pre with `post_res` too
// (then grad_x is unused: the stream gradient of each group goes to post_res's backward, in
// cache). The tokens are cut into chunks fixed by the shapes (reduction_chunks, never by threads),
// a chunk to a thread; per SIMD group of a chunk's tokens, while their rows stay in cache: (1) with
// grad_input, pre's gradient of h_pre (dot products with the streams) added to grad_pre; the coefficient gradients (dz, dm, c); (2) the stream gradient dx of
// the group's tokens, every term at once, written once (past the caches: it is read again only after
// the sub-layer's backward), and their share of dphi = v^T dm added to the chunk's partial [K, width]
// in token order. Then the partials are summed in chunk order, like dbias and dalpha: bit-identical
// results run to run and for any number of threads. (Groups of more tokens, to read phi^T and the
// partial once for more of them, were slower at C = 1024: the rows no longer fit in L2 beside them.)
template <typename S, typename A>
void mappings_bwd_kernel(const A* grad_pre, const A* grad_post, const A* grad_res, const S* x,
                         const A* phi, const A* alpha, const A* bias, const A* saved, int64_t tokens,
                         int n, int64_t hidden, int iters, S* grad_x, A* grad_phi, A* grad_alpha,
                         A* grad_bias, const S* grad_input, const A* h_pre, const S* grad_x_in,
                         const PostResBackward<S, A>* post_res = nullptr) {
  const int K = num_columns(n);
  const int KZ = K + 3;  // dz, then the three dalpha terms
  const int64_t width = n * hidden;

  // phi^T in ColumnBlocks layout, so that the dx loop runs along the rows of v; zero past each stream.
  const int64_t blocks_size = ColumnBlocks<A>::size(n, hidden, K);
  std::vector<A> phi_t(blocks_size, A(0));
  at::parallel_for(0, width, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t c = e % hidden, lane = c % kVec<A>;
      const int64_t block = ColumnBlocks<A>::offset(hidden, K, static_cast<int>(e / hidden), c - lane);
      for (int k = 0; k < K; ++k) phi_t[block + k * kVec<A> + lane] = phi[e * K + k];
    }
  });

  constexpr int kMatrices = SinkhornGroup<A>::kMatrices;
  constexpr int kDxRowGroups = kMatrices / kDxTokens<A>;
  const int64_t groups = (tokens + kMatrices - 1) / kMatrices;
  // Chunks of whole SIMD groups, of about kChunkTokens tokens: a few threads share even short inputs.
  constexpr int64_t kChunkTokens = 128;
  const int64_t wanted_chunks = reduction_chunks(tokens, width * K, kChunkTokens);
  const int64_t chunk_groups = std::max<int64_t>(1, (groups + wanted_chunks - 1) / wanted_chunks);
  const int64_t chunks = std::max<int64_t>(1, (groups + chunk_groups - 1) / chunk_groups);  // 1 for 0 tokens
  std::vector<A> dz(tokens * KZ), rms_term(tokens);
  std::unique_ptr<A[]> partial(new A[chunks * blocks_size]);  // written by each chunk's first group
  if (groups == 0) std::fill(partial.get(), partial.get() + blocks_size, A(0));  // the one chunk of no tokens
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    SinkhornGroup<A> group(n, iters);
    std::vector<A> z(kMatrices * K), grad_h_pre(kMatrices * n), dm(K);
    std::vector<A> dm_t(kDxRowGroups * K * kDxTokens<A>);  // per row group [K][kDxTokens]
    std::vector<S> group_dx(post_res != nullptr ? kMatrices * width : 0);  // post_res: the group's dx
    for (int64_t c = begin; c < end; ++c) {
      A* part = partial.get() + c * blocks_size;
      for (int64_t i = c * chunk_groups; i < std::min(groups, (c + 1) * chunk_groups); ++i) {
        const int64_t t0 = i * kMatrices;
        const int count = static_cast<int>(std::min<int64_t>(kMatrices, tokens - t0));
        for (int b = 0; b < count; ++b) {
          const int64_t t = t0 + b;
          const A* gp = grad_pre + t * n;
          if (grad_input != nullptr) {
            A* total = grad_h_pre.data() + b * n;
            MHC_DISPATCH_STREAMS(n, NT,
                                 stream_dots_row<NT>(x + t * width, grad_input + t * hidden, n, hidden, total));
            for (int s = 0; s < n; ++s) total[s] += gp[s];
            gp = total;
          }
          mappings_gates_backward(gp, grad_post + t * n, saved + t * (K + 1), alpha, bias, n, z.data() + b * K,
                                  dz.data() + t * KZ);
        }
        group.backward(z.data() + 2 * n, K, grad_res + t0 * n * n, n * n, dz.data() + t0 * KZ + 2 * n, KZ, count);
        std::fill(dm_t.begin(), dm_t.end(), A(0));
        for (int b = 0; b < count; ++b) {
          const int64_t t = t0 + b;
          const A* u = saved + t * (K + 1);
          A* dzt = dz.data() + t * KZ;
          rms_term[t] = mappings_projection_backward(dzt, u, u[K], alpha, n, width, dzt + K, dm.data());
          A* block = dm_t.data() + b / kDxTokens<A> * K * kDxTokens<A>;
          for (int k = 0; k < K; ++k) block[k * kDxTokens<A> + b % kDxTokens<A>] = dm[k];
        }
        DxRows<S, A> rows[kDxRowGroups];
        const int row_groups = (count + kDxTokens<A> - 1) / kDxTokens<A>;
        for (int r = 0; r < row_groups; ++r) {
          const int64_t t = t0 + r * kDxTokens<A>;
          S* dx = post_res != nullptr ? group_dx.data() + r * kDxTokens<A> * width : grad_x + t * width;
          rows[r] = {x + t * width, dx, grad_x_in ? grad_x_in + t * width : nullptr,
                     grad_input ? grad_input + t * hidden : nullptr, h_pre ? h_pre + t * n : nullptr,
                     dm_t.data() + r * K * kDxTokens<A>, rms_term.data() + t, width, hidden, n,
                     std::min(kDxTokens<A>, count - r * kDxTokens<A>)};
        }
        // Every row group passes over one block of phi^T and of the partial before the next block:
        // they stay in L1. Meanwhile the same block of the streams and of grad_input of the thread's
        // next group of tokens is fetched into L2: its dot products start from cache.
        const bool first = i == c * chunk_groups;
        const int64_t next_t0 = t0 + kMatrices;
        const int next_count = i + 1 < std::min(groups, end * chunk_groups)
                                   ? static_cast<int>(std::min<int64_t>(kMatrices, tokens - next_t0)) : 0;
        for (int stream = 0; stream < n; ++stream)
          for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
            prefetch_rows(x + next_t0 * width + stream * hidden + c0, width, next_count);
            if (grad_input != nullptr && stream == 0)
              prefetch_rows(grad_input + next_t0 * hidden + c0, hidden, next_count);
            for (int r = 0; r < row_groups; ++r) {
              constexpr bool kFull = decltype(full)::value;
              if (post_res != nullptr)
                dx_dphi_block<kFull, false>(rows[r], phi_t.data(), K, stream, c0, len, first && r == 0, part);
              else
                dx_dphi_block<kFull, true>(rows[r], phi_t.data(), K, stream, c0, len, first && r == 0, part);
            }
          });
        if (post_res != nullptr)
          for (int b = 0; b < count; ++b) {
            const int64_t t = t0 + b;
            const PostResBackward<S, A>& p = *post_res;
            MHC_DISPATCH_STREAMS(n, NT, post_res_backward_row<NT, true>(
                group_dx.data() + b * width, p.in.x + t * width, p.in.f + t * hidden, p.in.h_post + t * n,
                p.in.h_res + t * n * n, n, hidden, p.grad_x + t * width, p.grad_f + t * hidden, p.grad_h_post + t * n,
                p.grad_h_res + t * n * n));
          }
      }
    }
    finish_streaming_stores();
  });

  // dphi: the chunks' partials summed in chunk order, one block of columns (kVec<A> values of e) at
  // a time for every k, and written as the whole rows e of grad_phi [width, K] they make.
  const int64_t stream_blocks = ColumnBlocks<A>::per_stream(hidden);
  at::parallel_for(0, n * stream_blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> rows_of_e(kVec<A> * K);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block % stream_blocks * kVec<A>;
      const int len = static_cast<int>(std::min<int64_t>(kVec<A>, hidden - c0));
      const A* sums = partial.get() + block * K * kVec<A>;
      for (int k = 0; k < K; ++k) {
        Vec<A> total = load_vec<A, true>(sums + k * kVec<A>, kVec<A>);
        for (int64_t c = 1; c < chunks; ++c) total += load_vec<A, true>(sums + c * blocks_size + k * kVec<A>, kVec<A>);
        for (int l = 0; l < len; ++l) rows_of_e[l * K + k] = total[l];
      }
      std::copy(rows_of_e.begin(), rows_of_e.begin() + len * K, grad_phi + (block / stream_blocks * hidden + c0) * K);
    }
  });
  for (int k = 0; k < KZ; ++k) {
    A total = 0;
    for (int64_t t = 0; t < tokens; ++t) total += dz[t * KZ + k];
    if (k < K) grad_bias[k] = total;
    else grad_alpha[k - K] = total;
  }
}

namespace {

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The kernel of mappings_fwd (layer_input undefined), mappings_pre_fwd and, with `post_res_inputs`
// (x, f, h_post, h_res of post_res, whose output is `x` here), post_res_mappings_pre_fwd, on checked
// arguments.
void run_mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      int64_t iters, double eps, const at::Tensor& h_pre, const at::Tensor& h_post,
                      const at::Tensor& h_res, const at::Tensor& saved, const at::Tensor& layer_input,
                      const Four* post_res_inputs = nullptr) {
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    std::optional<PostResForward<scalar_t, A>> post_res;
    if (post_res_inputs != nullptr)
      post_res = PostResForward<scalar_t, A>{PostResInputs<scalar_t, A>::of(*post_res_inputs), x.data_ptr<scalar_t>()};
    mappings_fwd_kernel(x.data_ptr<scalar_t>(), phi.data_ptr<A>(), alpha.data_ptr<A>(), bias.data_ptr<A>(),
                        s.tokens, s.n, s.hidden, checked_iters(iters), static_cast<A>(eps), h_pre.data_ptr<A>(),
                        h_post.data_ptr<A>(), h_res.data_ptr<A>(), saved.data_ptr<A>(),
                        data_or_null<scalar_t>(layer_input), post_res ? &*post_res : nullptr);
  });
}

// The kernel of mappings_bwd (grad_input undefined), mappings_pre_bwd and, with `post_res_inputs`
// (x, f, h_post, h_res of post_res) and `post_res_grads` (their gradients, to write; the stream
// gradient of `outputs` is then undefined), post_res_mappings_pre_bwd, on checked arguments.
void run_mappings_bwd(const Four& outputs, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                      const at::Tensor& grad_res, const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                      const at::Tensor& bias, const at::Tensor& saved, int64_t iters, const at::Tensor& grad_input,
                      const at::Tensor& h_pre, const at::Tensor& grad_x_in, const Four* post_res_inputs = nullptr,
                      const Four* post_res_grads = nullptr) {
  const at::Tensor& grad_x = post_res_grads != nullptr ? std::get<0>(*post_res_grads) : std::get<0>(outputs);
  prefer_huge_pages(grad_x);
  const Streams s = check_streams(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    std::optional<PostResBackward<scalar_t, A>> post_res;
    if (post_res_inputs != nullptr) {
      const auto& [gx, gf, g_post, g_res] = *post_res_grads;
      post_res = PostResBackward<scalar_t, A>{PostResInputs<scalar_t, A>::of(*post_res_inputs), gx.data_ptr<scalar_t>(),
                                              gf.data_ptr<scalar_t>(), g_post.data_ptr<A>(), g_res.data_ptr<A>()};
    }
    mappings_bwd_kernel(grad_pre.data_ptr<A>(), grad_post.data_ptr<A>(), grad_res.data_ptr<A>(),
                        x.data_ptr<scalar_t>(), phi.data_ptr<A>(), alpha.data_ptr<A>(), bias.data_ptr<A>(),
                        saved.data_ptr<A>(), s.tokens, s.n, s.hidden, checked_iters(iters),
                        data_or_null<scalar_t>(std::get<0>(outputs)), std::get<1>(outputs).data_ptr<A>(),
                        std::get<2>(outputs).data_ptr<A>(), std::get<3>(outputs).data_ptr<A>(),
                        data_or_null<scalar_t>(grad_input), data_or_null<A>(h_pre), data_or_null<scalar_t>(grad_x_in),
                        post_res ? &*post_res : nullptr);
  });
}

}  // namespace

Four mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                  const at::Tensor& bias, int64_t iters, double eps) {
  auto outputs = mappings_fwd_outputs(x, phi, alpha, bias);
  const auto& [h_pre, h_post, h_res, saved] = outputs;
  run_mappings_fwd(x, phi, alpha, bias, iters, eps, h_pre, h_post, h_res, saved, {});
  return outputs;
}

Five mappings_pre_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                      const at::Tensor& bias, int64_t iters, double eps) {
  auto outputs = mappings_pre_fwd_outputs(x, phi, alpha, bias);
  const auto& [layer_input, h_pre, h_post, h_res, saved] = outputs;
  prefer_huge_pages(layer_input);
  run_mappings_fwd(x, phi, alpha, bias, iters, eps, h_pre, h_post, h_res, saved, layer_input);
  return outputs;
}

Four mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                  const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  const at::Tensor& saved, int64_t iters) {
  auto outputs = mappings_bwd_outputs(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved);
  run_mappings_bwd(outputs, grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved, iters, {}, {}, {});
  return outputs;
}

Four mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                      const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                      const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      const at::Tensor& h_pre, const at::Tensor& saved, int64_t iters) {
  auto outputs = mappings_pre_bwd_outputs(grad_input, grad_pre, grad_post, grad_res, grad_x_in, x, phi, alpha,
                                          bias, h_pre, saved);
  run_mappings_bwd(outputs, grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved, iters, grad_input, h_pre,
                   grad_x_in.has_value() ? *grad_x_in : at::Tensor());
  return outputs;
}

Six post_res_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double eps) {
  auto outputs = post_res_mappings_pre_fwd_outputs(x, f, h_post, h_res, phi, alpha, bias);
  const auto& [streams, layer_input, next_h_pre, next_h_post, next_h_res, saved] = outputs;
  prefer_huge_pages(streams);
  prefer_huge_pages(layer_input);
  const Four post_res_inputs{x, f, h_post, h_res};
  run_mappings_fwd(streams, phi, alpha, bias, iters, eps, next_h_pre, next_h_post, next_h_res, saved, layer_input,
                   &post_res_inputs);
  return outputs;
}

Seven post_res_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                const at::Tensor& grad_post, const at::Tensor& grad_res,
                                const std::optional<at::Tensor>& grad_streams, const at::Tensor& x,
                                const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res,
                                const at::Tensor& streams, const at::Tensor& phi, const at::Tensor& alpha,
                                const at::Tensor& bias, const at::Tensor& next_h_pre, const at::Tensor& saved,
                                int64_t iters) {
  auto outputs = post_res_mappings_pre_bwd_outputs(grad_input, grad_pre, grad_post, grad_res, grad_streams, x, f,
                                                   h_post, h_res, streams, phi, alpha, bias, next_h_pre, saved);
  const auto& [grad_x, grad_f, grad_h_post, grad_h_res, grad_phi, grad_alpha, grad_bias] = outputs;
  prefer_huge_pages(grad_f);
  const Four mappings_grads{at::Tensor(), grad_phi, grad_alpha, grad_bias};
  const Four post_res_inputs{x, f, h_post, h_res}, post_res_grads{grad_x, grad_f, grad_h_post, grad_h_res};
  run_mappings_bwd(mappings_grads, grad_pre, grad_post, grad_res, streams, phi, alpha, bias, saved, iters, grad_input,
                   next_h_pre, grad_streams.has_value() ? *grad_streams : at::Tensor(), &post_res_inputs,
                   &post_res_grads);
  return outputs;
}

}  // namespace cpu
}  // namespace mhc

// The per-token row loops that several kernels share: reading the n streams of one token into the
// sub-layer input and the dot products of the input's gradient with each stream (the gradient of
// h_pre), used by pre and mappings_pre; post_res forward and backward, used by post_res and
// post_res_mappings_pre. One token's n*C values at a time, a hardware vector of A at a time
// (cpu_vec.h); lanes are summed in a fixed order, so results do not depend on threads. NT > 0: n
// known at compile time (values of every stream in registers).
#pragma once

#include "cpu_vec.h"

namespace mhc {
namespace cpu {

// out[c] = sum_i h[i] * x[i * hidden + c] for one token's streams x [n, hidden] and weights h [n].
template <typename S, typename A>
void read_streams_row(const S* x, const A* h, int n, int64_t hidden, S* out) {
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    Vec<A> acc = {};
    for (int i = 0; i < n; ++i) acc += h[i] * load_vec<A, kFull>(x + i * hidden + c0, len);
    store_vec<A, kFull>(acc, len, out + c0);
  });
}

// dots[i] = sum_c grad[c] * x[i * hidden + c] for one token: the gradient of h_pre [n] given the
// gradient of the sub-layer input grad [hidden].
template <int NT, typename S, typename A>
void stream_dots_row(const S* x, const S* grad, int n_rt, int64_t hidden, A* dots) {
  const int n = NT > 0 ? NT : n_rt;
  Vec<A> lanes[kStreamSlots<NT>] = {};
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const Vec<A> g = load_vec<A, kFull>(grad + c0, len);
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) lanes[i] += g * load_vec<A, kFull>(x + i * hidden + c0, len);
  });
  for (int i = 0; i < n; ++i) dots[i] = sum_lanes<A>(lanes[i]);
}

// out[i] = sum_j h_res[i, j] x[j] + h_post[i] f for one token: streams x, out [n, hidden], its
// sub-layer output f [hidden], h_post [n], h_res [n, n].
template <int NT, typename S, typename A>
void post_res_row(const S* x, const S* f, const A* h_post, const A* h_res, int n_rt, int64_t hidden, S* out) {
  const int n = NT > 0 ? NT : n_rt;
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const Vec<A> fb = load_vec<A, kFull>(f + c0, len);
    Vec<A> v[kStreamSlots<NT>];
#pragma GCC unroll 16
    for (int j = 0; j < n; ++j) v[j] = load_vec<A, kFull>(x + j * hidden + c0, len);
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      Vec<A> acc = h_post[i] * fb;
#pragma GCC unroll 16
      for (int j = 0; j < n; ++j) acc += h_res[i * n + j] * v[j];
      store_vec<A, kFull>(acc, len, out + i * hidden + c0);
    }
  });
}

// post_res's backward for one token, given the gradient g [n, hidden] of its output:
// grad_x[j] = sum_i h_res[i, j] g[i] (kStreamGradX: stored past the caches, cpu_vec.h stream_vec),
// grad_f = sum_i h_post[i] g[i], and the coefficient gradients grad_h_post[i] = sum_c g[i] f,
// grad_h_res[i, j] = sum_c g[i] x[j], in vector lanes summed in a fixed order.
template <int NT, bool kStreamGradX, typename S, typename A>
void post_res_backward_row(const S* g, const S* x, const S* f, const A* h_post, const A* h_res, int n_rt,
                           int64_t hidden, S* grad_x, S* grad_f, A* grad_h_post, A* grad_h_res) {
  const int n = NT > 0 ? NT : n_rt;
  Vec<A> res_lanes[kStreamSlots<NT> * kStreamSlots<NT>] = {};
  Vec<A> post_lanes[kStreamSlots<NT>] = {};
  for_blocks<kVec<A>>(hidden, [&](int64_t c0, int len, auto full) {
    constexpr bool kFull = decltype(full)::value;
    const Vec<A> fb = load_vec<A, kFull>(f + c0, len);
    Vec<A> df = {}, gv[kStreamSlots<NT>], v[kStreamSlots<NT>];
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      gv[i] = load_vec<A, kFull>(g + i * hidden + c0, len);
      v[i] = load_vec<A, kFull>(x + i * hidden + c0, len);
    }
#pragma GCC unroll 16
    for (int i = 0; i < n; ++i) {
      df += h_post[i] * gv[i];
      post_lanes[i] += gv[i] * fb;
#pragma GCC unroll 16
      for (int j = 0; j < n; ++j) res_lanes[i * n + j] += gv[i] * v[j];
    }
#pragma GCC unroll 16
    for (int j = 0; j < n; ++j) {
      Vec<A> dx = {};
#pragma GCC unroll 16
      for (int i = 0; i < n; ++i) dx += h_res[i * n + j] * gv[i];
      if constexpr (kStreamGradX) stream_vec<A, kFull>(dx, len, grad_x + j * hidden + c0);
      else store_vec<A, kFull>(dx, len, grad_x + j * hidden + c0);
    }
    store_vec<A, kFull>(df, len, grad_f + c0);
  });
  for (int k = 0; k < n * n; ++k) grad_h_res[k] = sum_lanes<A>(res_lanes[k]);
  for (int i = 0; i < n; ++i) grad_h_post[i] = sum_lanes<A>(post_lanes[i]);
}

}  // namespace cpu
}  // namespace mhc

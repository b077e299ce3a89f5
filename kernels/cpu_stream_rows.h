// The per-token row loops that pre's kernels and the fused mappings_pre kernels share: reading the
// n streams of one token into the sub-layer input, and the dot products of the input's gradient
// with each stream (the gradient of h_pre). One token's n*C values at a time, a hardware vector of
// A at a time (cpu_vec.h); lanes are summed in a fixed order, so results do not depend on threads.
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
// gradient of the sub-layer input grad [hidden]. NT > 0: n known at compile time (registers).
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

}  // namespace cpu
}  // namespace mhc

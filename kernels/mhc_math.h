// Per-token math of the mHC operators, written once for the CPU (g++) and CUDA (nvcc) kernels.
//
// Conventions are those of mhc_megatron/ops/__init__.py: a token's streams are an n x C matrix
// (row i = stream i), h_res multiplies from the left, Sinkhorn starts from exp(L - max) with one
// max per matrix and normalises columns then rows (in the scale or the log domain, see below).
// Mapping columns (phi, bias, the projection u) are [pre (n) | post (n) | res (n*n, row-major)].
//
// Every function works on one token (one n x n matrix, or K = n*n + 2n coefficients) held in
// caller-provided arrays, in the accumulation type A (float, or double for float64 data); the
// scale-domain Sinkhorn works on a SIMD lane per matrix on the CPU (one matrix on the GPU).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MHC_HD __host__ __device__ __forceinline__
#else
#define MHC_HD inline
#endif

namespace mhc {

constexpr int kMaxStreams = 16;
constexpr int kMaxMatrix = kMaxStreams * kMaxStreams;
constexpr int kMaxColumns = kMaxMatrix + 2 * kMaxStreams;

MHC_HD int num_columns(int n) { return n * n + 2 * n; }

// Scratch values of one token's Sinkhorn backward: the 2*iters normaliser vectors of n values.
MHC_HD int sinkhorn_scratch_size(int n, int iters) { return 2 * iters * n; }

MHC_HD float exp_of(float v) { return expf(v); }
MHC_HD double exp_of(double v) { return exp(v); }
MHC_HD float log_of(float v) { return logf(v); }
MHC_HD double log_of(double v) { return log(v); }

MHC_HD float sqrt_of(float v) { return sqrtf(v); }
MHC_HD double sqrt_of(double v) { return sqrt(v); }
MHC_HD float tanh_of(float v) { return tanhf(v); }
MHC_HD double tanh_of(double v) { return tanh(v); }

// 1 / r with r = sqrt(mean(v^2) + eps) over the `width` = n*C values of a token.
template <typename A>
MHC_HD A inverse_rms(A sum_squares, long width, A eps) {
  return A(1) / sqrt_of(sum_squares / A(width) + eps);
}

template <typename A>
MHC_HD A sigmoid(A z) {
  return A(1) / (A(1) + exp_of(-z));
}

// Index of entry k of line `line` along a half-step: columns (line = j, k = i) or rows (line = i, k = j).
MHC_HD int line_index(bool columns, int n, int line, int k) {
  return columns ? k * n + line : line * n + k;
}

// log(sum_k exp(lm[line, k])) along one column or row, the max taken out first.
template <typename A>
MHC_HD A line_logsumexp(const A* lm, bool columns, int n, int line) {
  A top = lm[line_index(columns, n, line, 0)];
  for (int k = 1; k < n; ++k) {
    const A v = lm[line_index(columns, n, line, k)];
    top = v > top ? v : top;
  }
  A total = 0;
  for (int k = 0; k < n; ++k) total += exp_of(lm[line_index(columns, n, line, k)] - top);
  return top + log_of(total);
}

// Sinkhorn runs in one of two domains, the same math:
// * scale domain (the fast path): p = exp(L - max), then each half-step divides every column (then
//   every row) by its sum; no transcendental per iteration. After the first half-step every line
//   sum lies in [1/n, n], so nothing can overflow; the first one divides by sums >= exp(-spread),
//   spread = max(L) - min(L) of the matrix.
// * log domain (the fallback): lm = L - max, then lm -= logsumexp along each column, then row.
// A matrix whose spread passes scale_domain_spread runs in the log domain, so that exp(-spread)
// stays a normal number far from underflow (float 1.6e-28, double 1e-222).
MHC_HD float scale_domain_spread(float) { return 64.0f; }
MHC_HD double scale_domain_spread(double) { return 512.0; }

// Whether the matrix at m[k * stride] (k < n*n) runs in the scale domain.
template <typename A>
MHC_HD bool in_scale_domain(const A* m, int n, int stride) {
  A top = m[0], bottom = m[0];
  for (int k = 1; k < n * n; ++k) {
    const A v = m[k * stride];
    top = v > top ? v : top;
    bottom = v < bottom ? v : bottom;
  }
  return top - bottom <= scale_domain_spread(top);
}

// Scale domain on several matrices at once, V holding entry k of each: V = A is one matrix (the
// GPU, and the CPU's fallback), V a SIMD vector of A is one matrix per lane (the CPU, cpu_vec.h).
// The code is the same for both: comparisons select per lane, and exp runs lane by lane.
template <typename A, typename V>
MHC_HD V exp_lanes(V v) {
  if constexpr (sizeof(V) == sizeof(A)) {
    return exp_of(v);
  } else {
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(A)); ++l) v[l] = exp_of(v[l]);
    return v;
  }
}

// In place: logits p [n*n] -> the Sinkhorn matrices after `iters` iterations. When `sums` is not
// null it receives every half-step's line sums ([2*iters][n], columns first).
template <typename A, typename V>
MHC_HD void sinkhorn_scale_forward(V* p, int n, int iters, V* sums) {
  V top = p[0];
  for (int k = 1; k < n * n; ++k) top = p[k] > top ? p[k] : top;
  for (int k = 0; k < n * n; ++k) p[k] = exp_lanes<A>(p[k] - top);
  for (int step = 0; step < 2 * iters; ++step) {
    const bool columns = step % 2 == 0;
    for (int line = 0; line < n; ++line) {
      V total = {};
      for (int k = 0; k < n; ++k) total += p[line_index(columns, n, line, k)];
      const V inverse = A(1) / total;
      for (int k = 0; k < n; ++k) p[line_index(columns, n, line, k)] *= inverse;
      if (sums != nullptr) sums[step * n + line] = total;
    }
  }
}

// Gradient w.r.t. the logits (layout of sinkhorn_scale_forward). g holds the output gradient and
// receives the logits' gradient; p (n*n values) and sums (sinkhorn_scratch_size(n, iters)) are work
// space. Recomputes the iterations, then runs them in reverse: a half-step y = x / s (s = sum of x
// along the line) has the vector-Jacobian product gx = (gy - sum(gy * y)) / s along the line, and
// x = y * s. Then p = exp(L - max) gives g * p, and the max is differentiated like amax (split evenly
// among ties).
template <typename A, typename V>
MHC_HD void sinkhorn_scale_backward(const V* logits, V* g, int n, int iters, V* p, V* sums) {
  const int nn = n * n;
  for (int k = 0; k < nn; ++k) p[k] = logits[k];
  sinkhorn_scale_forward<A>(p, n, iters, sums);
  for (int step = 2 * iters - 1; step >= 0; --step) {
    const bool columns = step % 2 == 0;
    for (int line = 0; line < n; ++line) {
      V dot = {};
      for (int k = 0; k < n; ++k) {
        const int idx = line_index(columns, n, line, k);
        dot += g[idx] * p[idx];
      }
      const V s = sums[step * n + line];
      const V inverse = A(1) / s;  // one division per line, not per entry
      for (int k = 0; k < n; ++k) {
        const int idx = line_index(columns, n, line, k);
        g[idx] = (g[idx] - dot) * inverse;
        p[idx] *= s;  // back to the state before this half-step
      }
    }
  }
  V top = logits[0];
  for (int k = 1; k < nn; ++k) top = logits[k] > top ? logits[k] : top;
  const V zero = {}, one = zero + A(1);
  V total = {}, ties = {};
  for (int k = 0; k < nn; ++k) {
    g[k] *= p[k];
    total += g[k];
    ties += logits[k] == top ? one : zero;
  }
  const V share = total / ties;
  for (int k = 0; k < nn; ++k) g[k] -= logits[k] == top ? share : zero;
}

// Log domain, in place: logits lm [n*n] -> log of the Sinkhorn matrix after `iters` iterations.
// When `lse` is not null it receives the normaliser of every half-step ([2*iters][n], columns first).
template <typename A>
MHC_HD void sinkhorn_log_forward(A* lm, int n, int iters, A* lse) {
  A top = lm[0];
  for (int k = 1; k < n * n; ++k) top = lm[k] > top ? lm[k] : top;
  for (int k = 0; k < n * n; ++k) lm[k] -= top;
  for (int step = 0; step < 2 * iters; ++step) {
    const bool columns = step % 2 == 0;
    for (int line = 0; line < n; ++line) {
      const A norm = line_logsumexp(lm, columns, n, line);
      for (int k = 0; k < n; ++k) lm[line_index(columns, n, line, k)] -= norm;
      if (lse != nullptr) lse[step * n + line] = norm;
    }
  }
}

// Log-domain gradient of one matrix (lm: n*n work values, lse: sinkhorn_scratch_size). Recomputes
// the iterations, then runs them in reverse: a half-step l' = l - logsumexp(l) has the
// vector-Jacobian product g = g' - exp(l') * sum(g') along its axis. The max as in the scale domain.
template <typename A>
MHC_HD void sinkhorn_log_backward(const A* logits, const A* grad_out, A* grad_in, int n, int iters,
                                  A* lm, A* lse) {
  const int nn = n * n;
  for (int k = 0; k < nn; ++k) lm[k] = logits[k];
  sinkhorn_log_forward(lm, n, iters, lse);
  for (int k = 0; k < nn; ++k) grad_in[k] = grad_out[k] * exp_of(lm[k]);
  for (int step = 2 * iters - 1; step >= 0; --step) {
    const bool columns = step % 2 == 0;
    for (int line = 0; line < n; ++line) {
      A total = 0;
      for (int k = 0; k < n; ++k) total += grad_in[line_index(columns, n, line, k)];
      for (int k = 0; k < n; ++k) {
        const int idx = line_index(columns, n, line, k);
        grad_in[idx] -= exp_of(lm[idx]) * total;
        lm[idx] += lse[step * n + line];  // back to the state before this half-step
      }
    }
  }
  A top = logits[0];
  for (int k = 1; k < nn; ++k) top = logits[k] > top ? logits[k] : top;
  int ties = 0;
  A total = 0;
  for (int k = 0; k < nn; ++k) {
    ties += logits[k] == top;
    total += grad_in[k];
  }
  const A share = total / A(ties);
  for (int k = 0; k < nn; ++k) {
    if (logits[k] == top) grad_in[k] -= share;
  }
}

// One matrix in whichever domain fits it, in place: logits m [n*n] -> the Sinkhorn matrix.
template <typename A>
MHC_HD void sinkhorn_forward(A* m, int n, int iters) {
  if (in_scale_domain(m, n, 1)) {
    sinkhorn_scale_forward<A>(m, n, iters, static_cast<A*>(nullptr));
    return;
  }
  sinkhorn_log_forward(m, n, iters, static_cast<A*>(nullptr));
  for (int k = 0; k < n * n; ++k) m[k] = exp_of(m[k]);
}

// Gradient of one matrix in whichever domain fits it; work: n*n values, scratch:
// sinkhorn_scratch_size(n, iters) values.
template <typename A>
MHC_HD void sinkhorn_backward(const A* logits, const A* grad_out, A* grad_in, int n, int iters,
                              A* work, A* scratch) {
  if (in_scale_domain(logits, n, 1)) {
    for (int k = 0; k < n * n; ++k) grad_in[k] = grad_out[k];
    sinkhorn_scale_backward<A>(logits, grad_in, n, iters, work, scratch);
  } else {
    sinkhorn_log_backward(logits, grad_out, grad_in, n, iters, work, scratch);
  }
}

// Scale of mapping column k: alpha[0] (pre), alpha[1] (post) or alpha[2] (res).
MHC_HD int column_group(int n, int k) { return k < n ? 0 : (k < 2 * n ? 1 : 2); }

// Pre-activation z = alpha * u + bias of the K columns, from the normalised projection u = m / r.
template <typename A>
MHC_HD void mapping_logits(const A* u, const A* alpha, const A* bias, int n, A* z) {
  for (int k = 0; k < num_columns(n); ++k) z[k] = alpha[column_group(n, k)] * u[k] + bias[k];
}

// Gates of one token: projection u [K] -> z [K] (whose res part are the logits of h_res),
// h_pre [n], h_post [n].
template <typename A>
MHC_HD void mappings_gates(const A* u, const A* alpha, const A* bias, int n, A* z, A* h_pre, A* h_post) {
  mapping_logits(u, alpha, bias, n, z);
  for (int i = 0; i < n; ++i) {
    h_pre[i] = sigmoid(z[i]);
    h_post[i] = A(2) * sigmoid(z[n + i]);
  }
}

// Forward epilogue of one token: the gates, then h_res [n*n] = sinkhorn of z's res part.
template <typename A>
MHC_HD void mappings_epilogue(const A* u, const A* alpha, const A* bias, int n, int iters, A* z,
                              A* h_pre, A* h_post, A* h_res) {
  mappings_gates(u, alpha, bias, n, z, h_pre, h_post);
  for (int k = 0; k < n * n; ++k) h_res[k] = z[2 * n + k];
  sinkhorn_forward(h_res, n, iters);
}

// Backward of the gates of one token: z [K] as mappings_gates, and dz [2n] (pre, post parts of the
// gradient of z) from the output gradients.
template <typename A>
MHC_HD void mappings_gates_backward(const A* grad_pre, const A* grad_post, const A* u, const A* alpha,
                                    const A* bias, int n, A* z, A* dz) {
  mapping_logits(u, alpha, bias, n, z);
  for (int i = 0; i < n; ++i) {
    const A s_pre = sigmoid(z[i]);
    dz[i] = grad_pre[i] * s_pre * (A(1) - s_pre);
    const A s_post = sigmoid(z[n + i]);
    dz[n + i] = A(2) * grad_post[i] * s_post * (A(1) - s_post);
  }
}

// From the gradient dz [K] of z (also that of bias) and the saved u [K], inv_r = 1/r: dz * u summed
// per group into dalpha [3], the gradient dm [K] of the raw projection m = v @ phi, and the
// returned c such that dv = dm @ phi^T + c * v (the RMS term), for `width` = n*C values of v.
template <typename A>
MHC_HD A mappings_projection_backward(const A* dz, const A* u, A inv_r, const A* alpha, int n, long width,
                                      A* dalpha, A* dm) {
  A projected = 0;
  for (int g = 0; g < 3; ++g) dalpha[g] = 0;
  for (int k = 0; k < num_columns(n); ++k) {
    const int g = column_group(n, k);
    const A du = dz[k] * alpha[g];
    dm[k] = du * inv_r;
    projected += du * u[k];
    dalpha[g] += dz[k] * u[k];
  }
  return -projected * inv_r * inv_r / A(width);
}

// Backward of one token's coefficients: mappings_gates_backward, the Sinkhorn backward of the res
// part of dz, then mappings_projection_backward (its outputs and return value). z holds K values,
// lm n*n and lse sinkhorn_scratch_size(n, iters) (Sinkhorn backward work).
template <typename A>
MHC_HD A mappings_coeff_backward(const A* grad_pre, const A* grad_post, const A* grad_res,
                                 const A* u, A inv_r, const A* alpha, const A* bias, int n,
                                 int iters, long width, A* z, A* lm, A* lse, A* dz, A* dalpha,
                                 A* dm) {
  mappings_gates_backward(grad_pre, grad_post, u, alpha, bias, n, z, dz);
  sinkhorn_backward(z + 2 * n, grad_res, dz + 2 * n, n, iters, lm, lse);
  return mappings_projection_backward(dz, u, inv_r, alpha, n, width, dalpha, dm);
}

// ---------------------------------------------------------------- HC (hc_mappings_pre)
//
// HC's mappings (mhc_megatron/ops/hc_mappings_pre.py): per stream i of a token, the normalised
// projection u_i = (x_i @ W) / r_i with r_i = sqrt(mean(x_i^2) + eps) over C, n + 2 columns
// [pre | post | res (n)], then d = tanh(u) and the static parts. A token's saved values are n rows
// of hc_saved_width(n): u_i [n + 2], then 1/r_i.

MHC_HD int hc_columns(int n) { return n + 2; }
MHC_HD int hc_saved_width(int n) { return n + 3; }

// Coefficients of one token from its saved rows s [n][n + 3]: h_pre [n], h_post [n] and
// h_res [n*n] = A_r^T, A_r[i, j] = alpha[2] * d_i[2 + j] + static_res[i, j] (input i -> output j).
template <typename A>
MHC_HD void hc_coefficients(const A* s, const A* alpha, const A* static_pre, const A* static_post,
                            const A* static_res, int n, A* h_pre, A* h_post, A* h_res) {
  for (int i = 0; i < n; ++i) {
    const A* u = s + i * hc_saved_width(n);
    h_pre[i] = alpha[0] * tanh_of(u[0]) + static_pre[i];
    h_post[i] = alpha[1] * tanh_of(u[1]) + static_post[i];
    for (int j = 0; j < n; ++j) h_res[j * n + i] = alpha[2] * tanh_of(u[2 + j]) + static_res[i * n + j];
  }
}

// Backward of one token's coefficients, from the gradients of h_pre (all of it: the op's own and
// the sub-layer input's), h_post and h_res [n*n, output-major] and the saved rows s. Writes per
// stream i dm [n][n + 2], the gradient of the raw projection x_i @ W, and rms[i], the c of
// dx_i = dm_i @ W^T + c x_i (the norm's term); adds the token's terms to sums = [dalpha (3) |
// dstatic_pre (n) | dstatic_post (n) | dstatic_res (n*n, [input, output])].
template <typename A>
MHC_HD void hc_coefficients_backward(const A* grad_pre, const A* grad_post, const A* grad_res, const A* s,
                                     const A* alpha, int n, long hidden, A* dm, A* rms, A* sums) {
  const int k_count = hc_columns(n);
  A* dstatic_pre = sums + 3;
  A* dstatic_post = dstatic_pre + n;
  A* dstatic_res = dstatic_post + n;
  for (int i = 0; i < n; ++i) {
    const A* u = s + i * hc_saved_width(n);
    const A inv_r = u[k_count];
    A projected = 0;
    for (int k = 0; k < k_count; ++k) {
      const A g = k == 0 ? grad_pre[i] : (k == 1 ? grad_post[i] : grad_res[(k - 2) * n + i]);
      const int group = k < 2 ? k : 2;
      const A d = tanh_of(u[k]);
      const A du = alpha[group] * g * (A(1) - d * d);
      dm[i * k_count + k] = du * inv_r;
      projected += du * u[k];
      sums[group] += g * d;
    }
    rms[i] = -projected * inv_r * inv_r / A(hidden);
    dstatic_pre[i] += grad_pre[i];
    dstatic_post[i] += grad_post[i];
    for (int j = 0; j < n; ++j) dstatic_res[i * n + j] += grad_res[j * n + i];
  }
}

}  // namespace mhc

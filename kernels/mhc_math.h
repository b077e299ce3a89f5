// Per-token math of the mHC operators, written once for the CPU (g++) and CUDA (nvcc) kernels.
//
// Conventions are those of mhc_megatron/ops/__init__.py: a token's streams are an n x C matrix
// (row i = stream i), h_res multiplies from the left, Sinkhorn starts from exp(L - max) with one
// max per matrix and normalises columns then rows, in the log domain. Mapping columns (phi, bias,
// the projection u) are [pre (n) | post (n) | res (n*n, row-major)].
//
// Every function works on one token (one n x n matrix, or K = n*n + 2n coefficients) held in
// caller-provided arrays, in the accumulation type A (float, or double for float64 data).
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

// In place: logits lm [n*n] -> log of the Sinkhorn matrix after `iters` iterations. When `lse` is
// not null it receives the normaliser of every half-step ([2*iters][n], columns first).
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

// Gradient of sinkhorn w.r.t. the logits of one matrix. Recomputes the forward iterations into
// lm [n*n] (work) and lse (sinkhorn_scratch_size values), then runs them in reverse: a half-step
// l' = l - logsumexp(l) has the vector-Jacobian product g = g' - exp(l') * sum(g') along its axis.
// The max subtracted at the start is differentiated like amax (split evenly among ties).
template <typename A>
MHC_HD void sinkhorn_backward(const A* logits, const A* grad_out, A* grad_in, int n, int iters,
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

// Scale of mapping column k: alpha[0] (pre), alpha[1] (post) or alpha[2] (res).
MHC_HD int column_group(int n, int k) { return k < n ? 0 : (k < 2 * n ? 1 : 2); }

// Pre-activation z = alpha * u + bias of the K columns, from the normalised projection u = m / r.
template <typename A>
MHC_HD void mapping_logits(const A* u, const A* alpha, const A* bias, int n, A* z) {
  for (int k = 0; k < num_columns(n); ++k) z[k] = alpha[column_group(n, k)] * u[k] + bias[k];
}

// Forward epilogue of one token: projection u [K] -> h_pre [n], h_post [n], h_res [n*n].
// z [K] is work space (its res part ends as the log of h_res).
template <typename A>
MHC_HD void mappings_epilogue(const A* u, const A* alpha, const A* bias, int n, int iters, A* z,
                              A* h_pre, A* h_post, A* h_res) {
  mapping_logits(u, alpha, bias, n, z);
  for (int i = 0; i < n; ++i) {
    h_pre[i] = sigmoid(z[i]);
    h_post[i] = A(2) * sigmoid(z[n + i]);
  }
  A* res = z + 2 * n;
  sinkhorn_log_forward(res, n, iters, static_cast<A*>(nullptr));
  for (int k = 0; k < n * n; ++k) h_res[k] = exp_of(res[k]);
}

// Backward of one token's coefficients. Given the output gradients (grad_res may be the same
// values as h_res's layout [n*n]) and the saved u [K], inv_r = 1/r, it writes
//   dz [K]       gradient of z (also of bias), and dz * u summed per group into dalpha [3];
//   dm [K]       gradient of the raw projection m = v @ phi;
//   returns c    such that dv = dm @ phi^T + c * v (the RMS term), for `width` = n*C values of v.
// z holds K values, lm n*n and lse sinkhorn_scratch_size(n, iters) (Sinkhorn backward work).
template <typename A>
MHC_HD A mappings_coeff_backward(const A* grad_pre, const A* grad_post, const A* grad_res,
                                 const A* u, A inv_r, const A* alpha, const A* bias, int n,
                                 int iters, long width, A* z, A* lm, A* lse, A* dz, A* dalpha,
                                 A* dm) {
  mapping_logits(u, alpha, bias, n, z);
  for (int i = 0; i < n; ++i) {
    const A s_pre = sigmoid(z[i]);
    dz[i] = grad_pre[i] * s_pre * (A(1) - s_pre);
    const A s_post = sigmoid(z[n + i]);
    dz[n + i] = A(2) * grad_post[i] * s_post * (A(1) - s_post);
  }
  sinkhorn_backward(z + 2 * n, grad_res, dz + 2 * n, n, iters, lm, lse);
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

}  // namespace mhc

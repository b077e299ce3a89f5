// CUDA implementations of the mHC ops. The per-token math comes from mhc_math.h (the same
// functions the CPU kernels run). No float atomics: every reduction is a fixed tree (warp
// shuffles, then the warps in order), and the weight gradients of mappings are reduced in two
// stages (per token chunk partials, then the chunks in order), so results are bit-identical run
// to run. Kernel design and bytes moved: docs/kernels.md. The same source compiles as C++ with
// MHC_CUDA_ON_CPU, its kernels then running on the CPU (cuda_launch.h, cuda_on_cpu.h).
#include <torch/library.h>

#include "dispatch.h"
#include "cuda_launch.h"

namespace mhc {
namespace {

constexpr int kThreads = 256;  // every block; a multiple of the warp size
constexpr int kWarps = kThreads / 32;
constexpr int kOutputsPerThread = 4;  // mappings forward: (token, column) sums per thread
constexpr int kTokensPerDxBlock = 8;  // mappings backward: tokens sharing one read of phi's rows
constexpr int kColumnGroup = 32;      // mappings backward: dphi columns accumulated per pass over v

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sums each of the `count` values of every thread over the block, in a fixed order; the sums are
// valid in `out` (shared, count values) after the call for every thread. red: kWarps * count.
template <typename A>
__device__ void block_sum(A* values, int count, A* red, A* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int v = 0; v < count; ++v) {
    A s = values[v];
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) red[warp * count + v] = s;
  }
  __syncthreads();
  for (int v = threadIdx.x; v < count; v += blockDim.x) {
    A total = 0;
    for (int w = 0; w < kWarps; ++w) total += red[w * count + v];
    out[v] = total;
  }
  __syncthreads();
}

// ---------------------------------------------------------------- sinkhorn (one thread a matrix)

template <typename A>
__global__ void sinkhorn_fwd_kernel(const A* logits, A* out, int64_t count, int n, int iters) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= count) return;
  A lm[kMaxMatrix];
  for (int k = 0; k < n * n; ++k) lm[k] = logits[t * n * n + k];
  sinkhorn_forward(lm, n, iters);
  for (int k = 0; k < n * n; ++k) out[t * n * n + k] = lm[k];
}

// lse: sinkhorn_scratch_size(n, iters) values per matrix, in global memory (cached, per thread).
template <typename A>
__global__ void sinkhorn_bwd_kernel(const A* logits, const A* grad_out, A* grad_in, A* lse, int64_t count,
                                    int n, int iters) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= count) return;
  A lm[kMaxMatrix];
  const int64_t o = t * n * n;
  sinkhorn_backward(logits + o, grad_out + o, grad_in + o, n, iters, lm,
                    lse + t * sinkhorn_scratch_size(n, iters));
}

at::Tensor sinkhorn_fwd(const at::Tensor& logits, int64_t iters) {
  auto out = sinkhorn_fwd_outputs(logits);
  const int64_t count = logits.size(0);
  if (count == 0) return out;
  MHC_DEVICE_GUARD(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mhc_sinkhorn_fwd_cuda", [&] {
    MHC_LAUNCH(sinkhorn_fwd_kernel, ceil_div(count, kThreads), kThreads, 0,
        logits.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), count, logits.size(1), checked_iters(iters));
  });
  return out;
}

at::Tensor sinkhorn_bwd(const at::Tensor& logits, const at::Tensor& grad_out, int64_t iters) {
  auto grad_in = sinkhorn_bwd_outputs(logits, grad_out);
  const int64_t count = logits.size(0);
  if (count == 0) return grad_in;
  MHC_DEVICE_GUARD(logits);
  const int n = logits.size(1), steps = checked_iters(iters);
  auto lse = at::empty({count, sinkhorn_scratch_size(n, steps)}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mhc_sinkhorn_bwd_cuda", [&] {
    MHC_LAUNCH(sinkhorn_bwd_kernel, ceil_div(count, kThreads), kThreads, 0,
        logits.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(),
        lse.data_ptr<scalar_t>(), count, n, steps);
  });
  return grad_in;
}

// ---------------------------------------------------------------- mappings forward

// Layout of the forward kernel's shared memory for `tile` tokens, `chunk` values of v per stage.
struct MappingsTiling {
  int tile;   // tokens per block
  int chunk;  // values of v per shared-memory stage
  size_t bytes;
};

template <typename A>
MappingsTiling mappings_tiling(int columns) {
  const int outputs = columns + 1;  // the K columns of m, then sum(v^2)
  MappingsTiling t{std::max(1, std::min(64, kThreads * kOutputsPerThread / outputs)), 32, 0};
  for (;; t.chunk /= 2) {
    t.bytes = sizeof(A) * (t.tile * t.chunk + t.chunk * columns + t.tile * outputs);
    if (t.bytes <= 48 * 1024 || t.chunk == 1) return t;
  }
}

// One block: `tile` tokens. Stage `chunk` values of v of each token and the matching rows of phi
// in shared memory; thread j owns outputs j, j + 256, ... of the tile's (token, column) grid, the
// last column of each token being sum(v^2). Then one thread per token runs the epilogue.
template <typename S, typename A>
__global__ void mappings_fwd_kernel(const S* x, const A* phi, const A* alpha, const A* bias, int64_t tokens,
                                    int n, int64_t width, int tile, int chunk, int iters, A eps, A* h_pre,
                                    A* h_post, A* h_res, A* saved) {
  MHC_DYNAMIC_SHARED(shared_bytes);
  const int K = num_columns(n), outputs = K + 1;
  A* xs = reinterpret_cast<A*>(shared_bytes);  // [tile][chunk]
  A* ps = xs + tile * chunk;                    // [chunk][K]
  A* sums = ps + chunk * K;                     // [tile][K + 1]
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(tile);
  A acc[kOutputsPerThread] = {};
  for (int64_t e0 = 0; e0 < width; e0 += chunk) {
    for (int i = threadIdx.x; i < tile * chunk; i += blockDim.x) {
      const int64_t t = t0 + i / chunk, e = e0 + i % chunk;
      xs[i] = t < tokens && e < width ? static_cast<A>(x[t * width + e]) : A(0);
    }
    for (int i = threadIdx.x; i < chunk * K; i += blockDim.x)
      ps[i] = e0 + i / K < width ? phi[e0 * K + i] : A(0);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kOutputsPerThread; ++j) {
      const int o = threadIdx.x + j * blockDim.x;
      if (o < tile * outputs) {
        const A* xr = xs + (o / outputs) * chunk;
        const int k = o % outputs;
        A s = 0;
        for (int ee = 0; ee < chunk; ++ee) s += xr[ee] * (k < K ? ps[ee * K + k] : xr[ee]);
        acc[j] += s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kOutputsPerThread; ++j) {
    const int o = threadIdx.x + j * blockDim.x;
    if (o < tile * outputs) sums[o] = acc[j];
  }
  __syncthreads();
  const int64_t t = t0 + threadIdx.x;
  if (threadIdx.x < tile && t < tokens) {
    const A* m = sums + threadIdx.x * outputs;
    const A inv_r = inverse_rms(m[K], width, eps);
    A* u = saved + t * outputs;
    for (int k = 0; k < K; ++k) u[k] = m[k] * inv_r;
    u[K] = inv_r;
    A z[kMaxColumns];
    mappings_epilogue(u, alpha, bias, n, iters, z, h_pre + t * n, h_post + t * n, h_res + t * n * n);
  }
}

Four mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  int64_t iters, double eps) {
  auto outputs = mappings_fwd_outputs(x, phi, alpha, bias);
  const Streams s = check_streams(x);
  if (s.tokens == 0) return outputs;
  MHC_DEVICE_GUARD(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const MappingsTiling tiling = mappings_tiling<A>(num_columns(s.n));
    MHC_LAUNCH(mappings_fwd_kernel, ceil_div(s.tokens, tiling.tile), kThreads, tiling.bytes,
        x.data_ptr<scalar_t>(), phi.data_ptr<A>(), alpha.data_ptr<A>(), bias.data_ptr<A>(), s.tokens, s.n,
        s.n * s.hidden, tiling.tile, tiling.chunk, checked_iters(iters), static_cast<A>(eps),
        std::get<0>(outputs).data_ptr<A>(), std::get<1>(outputs).data_ptr<A>(),
        std::get<2>(outputs).data_ptr<A>(), std::get<3>(outputs).data_ptr<A>());
  });
  return outputs;
}

// ---------------------------------------------------------------- mappings backward

// One thread a token: dz [T, K + 3] (dz, then the three dalpha terms), dm [T, K], rms_term [T].
template <typename A>
__global__ void mappings_coeff_kernel(const A* grad_pre, const A* grad_post, const A* grad_res, const A* alpha,
                                      const A* bias, const A* saved, int64_t tokens, int n, int64_t width,
                                      int iters, A* lse, A* dz, A* dm, A* rms_term) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const int K = num_columns(n);
  const A* u = saved + t * (K + 1);
  A z[kMaxColumns], lm[kMaxMatrix];
  A* dzt = dz + t * (K + 3);
  rms_term[t] = mappings_coeff_backward(grad_pre + t * n, grad_post + t * n, grad_res + t * n * n, u, u[K],
                                        alpha, bias, n, iters, width, z, lm,
                                        lse + t * sinkhorn_scratch_size(n, iters), dzt, dzt + K, dm + t * K);
}

// dx[t, e] = rms_term[t] * v[t, e] + sum_k dm[t, k] * phi[e, k]: a thread per e, kTokensPerDxBlock
// tokens per block (blockIdx.x), their dm rows in shared memory.
template <typename S, typename A>
__global__ void mappings_dx_kernel(const S* x, const A* phi, const A* dm, const A* rms_term, int64_t tokens,
                                   int K, int64_t width, S* grad_x) {
  MHC_DYNAMIC_SHARED(shared_bytes);
  A* dms = reinterpret_cast<A*>(shared_bytes);  // [kTokensPerDxBlock][K]
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(kTokensPerDxBlock);
  const int valid = static_cast<int>(min(static_cast<int64_t>(kTokensPerDxBlock), tokens - t0));
  for (int i = threadIdx.x; i < valid * K; i += blockDim.x) dms[i] = dm[t0 * K + i];
  __syncthreads();
  const int64_t e = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= width) return;
  A acc[kTokensPerDxBlock];
#pragma unroll
  for (int b = 0; b < kTokensPerDxBlock; ++b)
    acc[b] = b < valid ? rms_term[t0 + b] * static_cast<A>(x[(t0 + b) * width + e]) : A(0);
  for (int k = 0; k < K; ++k) {
    const A p = phi[e * K + k];
#pragma unroll
    for (int b = 0; b < kTokensPerDxBlock; ++b) acc[b] += dms[b * K + k] * p;  // rows >= valid unused
  }
#pragma unroll
  for (int b = 0; b < kTokensPerDxBlock; ++b)
    if (b < valid) grad_x[(t0 + b) * width + e] = static_cast<S>(acc[b]);
}

// Stage 1 of dphi: partial[c, e, k] = sum over the tokens of chunk c of v[t, e] * dm[t, k], a thread
// per e (blockIdx.x), chunk blockIdx.y, kColumnGroup columns per pass over the chunk's tokens.
template <typename S, typename A>
__global__ void mappings_dphi_partial_kernel(const S* x, const A* dm, int64_t tokens, int K, int64_t width,
                                             int64_t chunk, A* partial) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= width) return;
  const int64_t c = blockIdx.y;
  const int64_t t_begin = c * chunk, t_end = min(tokens, t_begin + chunk);
  A* out = partial + (c * width + e) * K;
  for (int k0 = 0; k0 < K; k0 += kColumnGroup) {
    A acc[kColumnGroup] = {};
    for (int64_t t = t_begin; t < t_end; ++t) {
      const A v = static_cast<A>(x[t * width + e]);
      const A* d = dm + t * K + k0;
#pragma unroll
      for (int kk = 0; kk < kColumnGroup; ++kk)
        if (k0 + kk < K) acc[kk] += v * d[kk];
    }
#pragma unroll
    for (int kk = 0; kk < kColumnGroup; ++kk)
      if (k0 + kk < K) out[k0 + kk] = acc[kk];
  }
}

// Stage 2 of dphi: the chunks summed in order, a thread per entry of phi.
template <typename A>
__global__ void sum_chunks_kernel(const A* partial, int64_t chunks, int64_t size, A* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= size) return;
  A total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * size + i];
  out[i] = total;
}

// dbias and dalpha: column k of dz [T, K + 3] summed over tokens by block k (threads stride over
// tokens in order, then the block's fixed-order sum).
template <typename A>
__global__ void sum_columns_kernel(const A* dz, int64_t tokens, int K, A* grad_bias, A* grad_alpha) {
  __shared__ A red[kWarps];
  __shared__ A total;
  const int k = blockIdx.x;
  A s = 0;
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) s += dz[t * (K + 3) + k];
  block_sum(&s, 1, red, &total);
  if (threadIdx.x == 0) (k < K ? grad_bias[k] : grad_alpha[k - K]) = total;
}

Four mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                  const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  const at::Tensor& saved, int64_t iters) {
  auto outputs = mappings_bwd_outputs(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved);
  const Streams s = check_streams(x);
  if (s.tokens == 0) {
    std::get<1>(outputs).zero_();  // no tokens: zero weight gradients
    std::get<2>(outputs).zero_();
    std::get<3>(outputs).zero_();
    return outputs;
  }
  MHC_DEVICE_GUARD(x);
  const int K = num_columns(s.n), steps = checked_iters(iters);
  const int64_t width = s.n * s.hidden;
  const auto opts = phi.options();
  auto lse = at::empty({s.tokens, sinkhorn_scratch_size(s.n, steps)}, opts);
  auto dz = at::empty({s.tokens, K + 3}, opts);
  auto dm = at::empty({s.tokens, K}, opts);
  auto rms_term = at::empty({s.tokens}, opts);
  const int64_t chunks = reduction_chunks(s.tokens, width * K);
  const int64_t chunk = ceil_div(s.tokens, chunks);
  auto partial = at::empty({chunks, width, K}, opts);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_mappings_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_LAUNCH(mappings_coeff_kernel, ceil_div(s.tokens, kThreads), kThreads, 0,
        grad_pre.data_ptr<A>(), grad_post.data_ptr<A>(), grad_res.data_ptr<A>(), alpha.data_ptr<A>(),
        bias.data_ptr<A>(), saved.data_ptr<A>(), s.tokens, s.n, width, steps, lse.data_ptr<A>(),
        dz.data_ptr<A>(), dm.data_ptr<A>(), rms_term.data_ptr<A>());
    const dim3 dx_grid(ceil_div(s.tokens, kTokensPerDxBlock), ceil_div(width, kThreads));
    MHC_LAUNCH(mappings_dx_kernel, dx_grid, kThreads, sizeof(A) * kTokensPerDxBlock * K,
        x.data_ptr<scalar_t>(), phi.data_ptr<A>(), dm.data_ptr<A>(), rms_term.data_ptr<A>(), s.tokens, K, width,
        std::get<0>(outputs).data_ptr<scalar_t>());
    const dim3 partial_grid(ceil_div(width, kThreads), chunks);
    MHC_LAUNCH(mappings_dphi_partial_kernel, partial_grid, kThreads, 0,
        x.data_ptr<scalar_t>(), dm.data_ptr<A>(), s.tokens, K, width, chunk, partial.data_ptr<A>());
    MHC_LAUNCH(sum_chunks_kernel, ceil_div(width * K, kThreads), kThreads, 0,
        partial.data_ptr<A>(), chunks, width * K, std::get<1>(outputs).data_ptr<A>());
    MHC_LAUNCH(sum_columns_kernel, K + 3, kThreads, 0,
        dz.data_ptr<A>(), s.tokens, K, std::get<3>(outputs).data_ptr<A>(), std::get<2>(outputs).data_ptr<A>());
  });
  return outputs;
}

// ---------------------------------------------------------------- pre

// out[t, c] = sum_i h_pre[t, i] * x[t, i, c]: a thread per (t, c).
template <typename S, typename A>
__global__ void pre_fwd_kernel(const S* x, const A* h_pre, S* out, int64_t tokens, int n, int64_t hidden) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= tokens * hidden) return;
  const int64_t t = idx / hidden, c = idx % hidden;
  A acc = 0;
  for (int i = 0; i < n; ++i) acc += h_pre[t * n + i] * static_cast<A>(x[(t * n + i) * hidden + c]);
  out[idx] = static_cast<S>(acc);
}

// A block per token: dx[i, c] = h_pre[i] * g[c], and dh[i] = sum_c g[c] x[i, c] by block_sum.
template <int NT, typename S, typename A>
__global__ void pre_bwd_kernel(const S* grad_out, const S* x, const A* h_pre, S* grad_x, A* grad_h, int n_rt,
                               int64_t hidden) {
  constexpr int NA = NT > 0 ? NT : kMaxStreams;
  __shared__ A red[kWarps * NA];
  const int n = NT > 0 ? NT : n_rt;
  const int64_t t = blockIdx.x;
  A h[NA], acc[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) {
    h[i] = i < n ? h_pre[t * n + i] : A(0);
    acc[i] = 0;
  }
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    const A g = static_cast<A>(grad_out[t * hidden + c]);
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      if (i < n) {
        const int64_t o = (t * n + i) * hidden + c;
        acc[i] += g * static_cast<A>(x[o]);
        grad_x[o] = static_cast<S>(h[i] * g);
      }
    }
  }
  block_sum(acc, n, red, grad_h + t * n);
}

at::Tensor pre_fwd(const at::Tensor& x, const at::Tensor& h_pre) {
  auto out = pre_fwd_output(x, h_pre);
  const Streams s = check_streams(x);
  if (out.numel() == 0) return out;
  MHC_DEVICE_GUARD(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_pre_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_LAUNCH(pre_fwd_kernel, ceil_div(out.numel(), kThreads), kThreads, 0,
        x.data_ptr<scalar_t>(), h_pre.data_ptr<A>(), out.data_ptr<scalar_t>(), s.tokens, s.n, s.hidden);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pre_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h_pre) {
  auto outputs = pre_bwd_outputs(grad_out, x, h_pre);
  const Streams s = check_streams(x);
  if (s.tokens == 0) return outputs;
  MHC_DEVICE_GUARD(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_pre_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, MHC_LAUNCH(pre_bwd_kernel<NT>, s.tokens, kThreads, 0,
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), h_pre.data_ptr<A>(),
        std::get<0>(outputs).data_ptr<scalar_t>(), std::get<1>(outputs).data_ptr<A>(), s.n, s.hidden));
  });
  return outputs;
}

// ---------------------------------------------------------------- post_res

// out[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] f[t, c]: a thread per (t, c), all i.
template <int NT, typename S, typename A>
__global__ void post_res_fwd_kernel(const S* x, const S* f, const A* h_post, const A* h_res, S* out,
                                    int64_t tokens, int n_rt, int64_t hidden) {
  constexpr int NA = NT > 0 ? NT : kMaxStreams;
  const int n = NT > 0 ? NT : n_rt;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= tokens * hidden) return;
  const int64_t t = idx / hidden, c = idx % hidden;
  const A fv = static_cast<A>(f[idx]);
  A v[NA];
#pragma unroll
  for (int j = 0; j < NA; ++j) v[j] = j < n ? static_cast<A>(x[(t * n + j) * hidden + c]) : A(0);
  for (int i = 0; i < n; ++i) {
    A acc = h_post[t * n + i] * fv;
#pragma unroll
    for (int j = 0; j < NA; ++j)
      if (j < n) acc += h_res[(t * n + i) * n + j] * v[j];
    out[(t * n + i) * hidden + c] = static_cast<S>(acc);
  }
}

// A block per token: dx[j, c] = sum_i h_res[i, j] g[i, c], df[c] = sum_i h_post[i] g[i, c]; the
// coefficient gradients dh_post[i] = sum_c g[i, c] f[c], dh_res[i, j] = sum_c g[i, c] x[j, c] by
// block_sum. Per-thread sums: n*n + n values (registers for the compile-time n).
template <int NT, typename S, typename A>
__global__ void post_res_bwd_kernel(const S* grad_out, const S* x, const S* f, const A* h_post, const A* h_res,
                                    S* grad_x, S* grad_f, A* grad_h_post, A* grad_h_res, int n_rt,
                                    int64_t hidden) {
  constexpr int NA = NT > 0 ? NT : kMaxStreams;
  __shared__ A red[kWarps * (NA * NA + NA)];
  __shared__ A sums[NA * NA + NA];
  const int n = NT > 0 ? NT : n_rt;
  const int64_t t = blockIdx.x;
  A acc[NA * NA + NA];  // [n*n] res terms (row i, column j at i*n + j), then [n] post terms
#pragma unroll
  for (int k = 0; k < NA * NA + NA; ++k) acc[k] = 0;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    const A fv = static_cast<A>(f[t * hidden + c]);
    A g[NA], v[NA];
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      g[i] = i < n ? static_cast<A>(grad_out[(t * n + i) * hidden + c]) : A(0);
      v[i] = i < n ? static_cast<A>(x[(t * n + i) * hidden + c]) : A(0);
    }
    A df = 0;
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      if (i >= n) continue;
      df += h_post[t * n + i] * g[i];
      acc[n * n + i] += g[i] * fv;
#pragma unroll
      for (int j = 0; j < NA; ++j)
        if (j < n) acc[i * n + j] += g[i] * v[j];
    }
    grad_f[t * hidden + c] = static_cast<S>(df);
#pragma unroll
    for (int j = 0; j < NA; ++j) {
      if (j >= n) continue;
      A dx = 0;
#pragma unroll
      for (int i = 0; i < NA; ++i)
        if (i < n) dx += h_res[(t * n + i) * n + j] * g[i];
      grad_x[(t * n + j) * hidden + c] = static_cast<S>(dx);
    }
  }
  block_sum(acc, n * n + n, red, sums);
  for (int k = threadIdx.x; k < n * n + n; k += blockDim.x) {
    if (k < n * n) grad_h_res[t * n * n + k] = sums[k];
    else grad_h_post[t * n + k - n * n] = sums[k];
  }
}

at::Tensor post_res_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res) {
  auto out = post_res_fwd_output(x, f, h_post, h_res);
  const Streams s = check_streams(x);
  if (out.numel() == 0) return out;
  MHC_DEVICE_GUARD(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t blocks = ceil_div(s.tokens * s.hidden, kThreads);
    MHC_DISPATCH_STREAMS(s.n, NT, MHC_LAUNCH(post_res_fwd_kernel<NT>, blocks, kThreads, 0,
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), h_post.data_ptr<A>(), h_res.data_ptr<A>(),
        out.data_ptr<scalar_t>(), s.tokens, s.n, s.hidden));
  });
  return out;
}

Four post_res_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                  const at::Tensor& h_res) {
  auto outputs = post_res_bwd_outputs(grad_out, x, f, h_post, h_res);
  const Streams s = check_streams(x);
  if (s.tokens == 0) return outputs;
  MHC_DEVICE_GUARD(x);
  MHC_DISPATCH_FLOATS(x.scalar_type(), "mhc_post_res_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    MHC_DISPATCH_STREAMS(s.n, NT, MHC_LAUNCH(post_res_bwd_kernel<NT>, s.tokens, kThreads, 0,
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), h_post.data_ptr<A>(),
        h_res.data_ptr<A>(), std::get<0>(outputs).data_ptr<scalar_t>(), std::get<1>(outputs).data_ptr<scalar_t>(),
        std::get<2>(outputs).data_ptr<A>(), std::get<3>(outputs).data_ptr<A>(), s.n, s.hidden));
  });
  return outputs;
}

// ---------------------------------------------------------------- mappings_pre

// On CUDA, mappings_pre composes the kernels above: mappings then pre in forward (two reads of the
// streams), and in backward pre's, then mappings' kernels, the stream gradients summed by ATen.
// The same results as the CPU's fused kernel, not yet its memory traffic (docs/kernels.md).
Five mappings_pre_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      int64_t iters, double eps) {
  auto [h_pre, h_post, h_res, saved] = mappings_fwd(x, phi, alpha, bias, iters, eps);
  return {pre_fwd(x, h_pre), h_pre, h_post, h_res, saved};
}

Four mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                      const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                      const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      const at::Tensor& h_pre, const at::Tensor& saved, int64_t iters) {
  check_mappings_pre_bwd(grad_input, grad_x_in, x, h_pre);
  auto [grad_x_pre, grad_h_pre] = pre_bwd(grad_input, x, h_pre);
  auto outputs = mappings_bwd(grad_pre + grad_h_pre, grad_post, grad_res, x, phi, alpha, bias, saved, iters);
  std::get<0>(outputs).add_(grad_x_pre);
  if (grad_x_in.has_value()) std::get<0>(outputs).add_(*grad_x_in);
  return outputs;
}

}  // namespace
}  // namespace mhc

MHC_REGISTER_CUDA_KERNELS

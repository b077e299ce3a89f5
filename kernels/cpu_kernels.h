// The CPU kernels of one instruction-set level, as a table of functions.
//
// The CPU kernels (mhc_cpu_*.cpp and cpu_level.cpp) are compiled
// once per level (kernels/extension.py: `scalar` with the compiler's portable default, `avx2` with
// AVX2 + FMA, `avx512` with AVX-512 F/BW/DQ/VL) into a shared library of its own, mhc_megatron/_cpu_<level>.<python extension suffix>, whose only exported symbol is
// kCpuKernelsSymbol: a function returning this table. Each level is a library of its own (symbols
// hidden) so that no inline function compiled for AVX-512 can be picked by the linker for code
// that runs on a CPU without it. cpu_dispatch.cpp (in mhc_megatron._C) loads the library of the
// level it chooses when an op first runs, and forwards the registered CPU ops to its table.
#pragma once

#include "dispatch.h"

namespace mhc {

// Bumped whenever the table changes, so that a stale level library is refused, not called.
constexpr int kCpuKernelsAbi = 4;

struct CpuKernels {
  int abi;
  const char* level;
  at::Tensor (*sinkhorn_fwd)(const at::Tensor& logits, int64_t iters);
  at::Tensor (*sinkhorn_bwd)(const at::Tensor& logits, const at::Tensor& grad_out, int64_t iters);
  Four (*mappings_fwd)(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                       int64_t iters, double eps);
  Four (*mappings_bwd)(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                       const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                       const at::Tensor& saved, int64_t iters);
  Five (*mappings_pre_fwd)(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                           const at::Tensor& bias, int64_t iters, double eps);
  Four (*mappings_pre_bwd)(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                           const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in,
                           const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha,
                           const at::Tensor& bias, const at::Tensor& h_pre, const at::Tensor& saved, int64_t iters);
  at::Tensor (*pre_fwd)(const at::Tensor& x, const at::Tensor& h_pre);
  std::tuple<at::Tensor, at::Tensor> (*pre_bwd)(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& h_pre);
  at::Tensor (*post_res_fwd)(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                             const at::Tensor& h_res);
  Four (*post_res_bwd)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f,
                       const at::Tensor& h_post, const at::Tensor& h_res);
  Five (*hc_mappings_pre_fwd)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                              const at::Tensor& static_pre, const at::Tensor& static_post,
                              const at::Tensor& static_res, double eps);
  Six (*hc_mappings_pre_bwd)(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                             const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in,
                             const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                             const at::Tensor& h_pre, const at::Tensor& saved);
  Six (*post_res_mappings_pre_fwd)(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                                   const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                                   const at::Tensor& bias, int64_t iters, double eps);
  Seven (*post_res_mappings_pre_bwd)(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                     const at::Tensor& grad_post, const at::Tensor& grad_res,
                                     const std::optional<at::Tensor>& grad_streams, const at::Tensor& x,
                                     const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res,
                                     const at::Tensor& streams, const at::Tensor& phi, const at::Tensor& alpha,
                                     const at::Tensor& bias, const at::Tensor& next_h_pre, const at::Tensor& saved,
                                     int64_t iters);
};

using CpuKernelsGetter = const CpuKernels* (*)();

// The entries of the table, defined in mhc_cpu_{mappings,pre,post_res,hc}.cpp (post_res_mappings_pre
// in mhc_cpu_mappings.cpp; compiled
// into each level library, never into mhc_megatron._C).
namespace cpu {
at::Tensor sinkhorn_fwd(const at::Tensor& logits, int64_t iters);
at::Tensor sinkhorn_bwd(const at::Tensor& logits, const at::Tensor& grad_out, int64_t iters);
Four mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  int64_t iters, double eps);
Four mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                  const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  const at::Tensor& saved, int64_t iters);
Five mappings_pre_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      int64_t iters, double eps);
Four mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                      const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                      const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      const at::Tensor& h_pre, const at::Tensor& saved, int64_t iters);
at::Tensor pre_fwd(const at::Tensor& x, const at::Tensor& h_pre);
std::tuple<at::Tensor, at::Tensor> pre_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h_pre);
at::Tensor post_res_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res);
Four post_res_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                  const at::Tensor& h_res);
Five hc_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                         const at::Tensor& static_pre, const at::Tensor& static_post, const at::Tensor& static_res,
                         double eps);
Six hc_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                        const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                        const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& h_pre,
                        const at::Tensor& saved);
Six post_res_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double eps);
Seven post_res_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                const at::Tensor& grad_post, const at::Tensor& grad_res,
                                const std::optional<at::Tensor>& grad_streams, const at::Tensor& x,
                                const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res,
                                const at::Tensor& streams, const at::Tensor& phi, const at::Tensor& alpha,
                                const at::Tensor& bias, const at::Tensor& next_h_pre, const at::Tensor& saved,
                                int64_t iters);
}  // namespace cpu
constexpr const char* kCpuKernelsSymbol = "mhc_cpu_kernels";

}  // namespace mhc

// Run-time choice of the CPU kernels' instruction-set level, and the CPU registrations of the ops.
//
// Levels, lowest first: `scalar` (the compiler's portable default: SSE2 on x86-64, no FMA),
// `avx2` (AVX2 + FMA), `avx512` (AVX-512 F/BW/DQ/VL + AVX2 + FMA). Each is a library of its own
// (cpu_kernels.h). The active level is chosen when a CPU op first runs: the MHC_CPU_ISA
// environment variable if set, else the highest level this CPU can run; the op `set_cpu_isa`
// changes it later ("auto" = the highest again). Only the active level's library is ever loaded,
// so a build made on one machine runs on any other of the same architecture.
#include <dlfcn.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace mhc {
namespace {

constexpr std::array<const char*, 3> kLevels = {"scalar", "avx2", "avx512"};
constexpr const char* kLevelVariable = "MHC_CPU_ISA";

std::string level_list(const std::vector<std::string>& levels) {
  std::string joined;
  for (const auto& level : levels) joined += (joined.empty() ? "" : ", ") + level;
  return joined;
}

// Whether this CPU (and its operating system, which must save the wide registers) runs a level.
bool cpu_runs(size_t level) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return level == 0 || (level == 1 && avx2) || (level == 2 && avx512);
#else
  return level == 0;  // elsewhere only the portable level is built
#endif
}

size_t level_index(const std::string& name, const char* what) {
  size_t i = 0;
  while (i < kLevels.size() && name != kLevels[i]) ++i;
  TORCH_CHECK_VALUE(i < kLevels.size(), what, " must be one of scalar, avx2, avx512 (or auto), got '", name, "'");
  return i;
}

// The path of level `level`'s library: beside this library (mhc_megatron/_C<suffix>), named
// _cpu_<level><suffix>.
std::string library_path(size_t level) {
  Dl_info info{};
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&library_path), &info) != 0 && info.dli_fname != nullptr,
              "mhc_megatron: cannot locate the _C library to find the CPU kernels beside it");
  const std::string self = info.dli_fname;
  const size_t slash = self.rfind('/');
  const std::string folder = self.substr(0, slash + 1), name = self.substr(slash + 1);
  TORCH_CHECK(name.rfind("_C", 0) == 0, "mhc_megatron: unexpected library name ", self);
  return folder + "_cpu_" + kLevels[level] + name.substr(2);
}

const CpuKernels* load_level(size_t level) {
  const std::string path = library_path(level);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "mhc_megatron: the CPU kernels of level ", kLevels[level],
              " cannot be loaded (", dlerror(), "); rebuild the extension (make setup, or pip install -e .)");
  auto getter = reinterpret_cast<CpuKernelsGetter>(dlsym(handle, kCpuKernelsSymbol));
  TORCH_CHECK(getter != nullptr, "mhc_megatron: ", path, " has no symbol ", kCpuKernelsSymbol);
  const CpuKernels* table = getter();
  TORCH_CHECK(table->abi == kCpuKernelsAbi && std::string(table->level) == kLevels[level], "mhc_megatron: ",
              path, " is a stale build (level '", table->level, "', table version ", table->abi, ", expected '",
              kLevels[level], "', version ", kCpuKernelsAbi, "); rebuild the extension");
  return table;
}

// Loaded tables (one per level, never unloaded) and the active one.
std::mutex g_mutex;
std::array<const CpuKernels*, kLevels.size()> g_loaded{};
std::atomic<const CpuKernels*> g_active{nullptr};

std::vector<std::string> runnable_levels() {
  std::vector<std::string> levels;
  for (size_t i = 0; i < kLevels.size(); ++i)
    if (cpu_runs(i)) levels.emplace_back(kLevels[i]);
  return levels;
}

size_t highest_runnable() {
  size_t best = 0;
  for (size_t i = 0; i < kLevels.size(); ++i)
    if (cpu_runs(i)) best = i;
  return best;
}

// Makes `level` the active one (loading it if needed); `what` names the source of the choice.
const CpuKernels* activate(size_t level, const char* what) {
  TORCH_CHECK_VALUE(cpu_runs(level), what, "='", kLevels[level], "': this CPU cannot run it (it runs: ",
                    level_list(runnable_levels()), ")");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_loaded[level] == nullptr) g_loaded[level] = load_level(level);
  g_active.store(g_loaded[level]);
  return g_loaded[level];
}

const CpuKernels& active() {
  const CpuKernels* table = g_active.load();
  if (table != nullptr) return *table;
  const char* forced = std::getenv(kLevelVariable);
  if (forced != nullptr && *forced != '\0' && std::string(forced) != "auto")
    return *activate(level_index(forced, kLevelVariable), kLevelVariable);
  return *activate(highest_runnable(), "the highest level");
}

// ---------------------------------------------------------------- ops

std::string cpu_isa() { return active().level; }

void set_cpu_isa(const std::string& level) {
  if (level == "auto") activate(highest_runnable(), "the highest level");
  else activate(level_index(level, "level"), "level");
}

std::vector<std::string> cpu_isa_levels() { return runnable_levels(); }

at::Tensor sinkhorn_fwd(const at::Tensor& logits, int64_t iters) { return active().sinkhorn_fwd(logits, iters); }

at::Tensor sinkhorn_bwd(const at::Tensor& logits, const at::Tensor& grad_out, int64_t iters) {
  return active().sinkhorn_bwd(logits, grad_out, iters);
}

Four mappings_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  int64_t iters, double eps) {
  return active().mappings_fwd(x, phi, alpha, bias, iters, eps);
}

Four mappings_bwd(const at::Tensor& grad_pre, const at::Tensor& grad_post, const at::Tensor& grad_res,
                  const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                  const at::Tensor& saved, int64_t iters) {
  return active().mappings_bwd(grad_pre, grad_post, grad_res, x, phi, alpha, bias, saved, iters);
}

Five mappings_pre_fwd(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      int64_t iters, double eps) {
  return active().mappings_pre_fwd(x, phi, alpha, bias, iters, eps);
}

Four mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                      const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                      const at::Tensor& phi, const at::Tensor& alpha, const at::Tensor& bias,
                      const at::Tensor& h_pre, const at::Tensor& saved, int64_t iters) {
  return active().mappings_pre_bwd(grad_input, grad_pre, grad_post, grad_res, grad_x_in, x, phi, alpha, bias, h_pre,
                                   saved, iters);
}

at::Tensor pre_fwd(const at::Tensor& x, const at::Tensor& h_pre) { return active().pre_fwd(x, h_pre); }

std::tuple<at::Tensor, at::Tensor> pre_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h_pre) {
  return active().pre_bwd(grad_out, x, h_pre);
}

at::Tensor post_res_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res) {
  return active().post_res_fwd(x, f, h_post, h_res);
}

Four post_res_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                  const at::Tensor& h_res) {
  return active().post_res_bwd(grad_out, x, f, h_post, h_res);
}

Five hc_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                         const at::Tensor& static_pre, const at::Tensor& static_post, const at::Tensor& static_res,
                         double eps) {
  return active().hc_mappings_pre_fwd(x, weight, alpha, static_pre, static_post, static_res, eps);
}

Six hc_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre, const at::Tensor& grad_post,
                        const at::Tensor& grad_res, const std::optional<at::Tensor>& grad_x_in, const at::Tensor& x,
                        const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& h_pre,
                        const at::Tensor& saved) {
  return active().hc_mappings_pre_bwd(grad_input, grad_pre, grad_post, grad_res, grad_x_in, x, weight, alpha, h_pre,
                                      saved);
}

Six post_res_mappings_pre_fwd(const at::Tensor& x, const at::Tensor& f, const at::Tensor& h_post,
                              const at::Tensor& h_res, const at::Tensor& phi, const at::Tensor& alpha,
                              const at::Tensor& bias, int64_t iters, double eps) {
  return active().post_res_mappings_pre_fwd(x, f, h_post, h_res, phi, alpha, bias, iters, eps);
}

Seven post_res_mappings_pre_bwd(const at::Tensor& grad_input, const at::Tensor& grad_pre,
                                const at::Tensor& grad_post, const at::Tensor& grad_res,
                                const std::optional<at::Tensor>& grad_streams, const at::Tensor& x,
                                const at::Tensor& f, const at::Tensor& h_post, const at::Tensor& h_res,
                                const at::Tensor& streams, const at::Tensor& phi, const at::Tensor& alpha,
                                const at::Tensor& bias, const at::Tensor& next_h_pre, const at::Tensor& saved,
                                int64_t iters) {
  return active().post_res_mappings_pre_bwd(grad_input, grad_pre, grad_post, grad_res, grad_streams, x, f, h_post,
                                            h_res, streams, phi, alpha, bias, next_h_pre, saved, iters);
}

}  // namespace
}  // namespace mhc

MHC_REGISTER_KERNELS(CPU)

// The ops with CPU kernels only (no CUDA kernel yet: on CUDA tensors the Python side runs the
// reference, or for post_res_mappings_pre the CUDA kernels of its two halves; mhc_megatron/ops/fused.py
// CPU_ONLY_OPS).
TORCH_LIBRARY_IMPL(mhc_megatron, CPU, m) {
  m.impl("hc_mappings_pre_fwd", &mhc::hc_mappings_pre_fwd);
  m.impl("hc_mappings_pre_bwd", &mhc::hc_mappings_pre_bwd);
  m.impl("post_res_mappings_pre_fwd", &mhc::post_res_mappings_pre_fwd);
  m.impl("post_res_mappings_pre_bwd", &mhc::post_res_mappings_pre_bwd);
}

TORCH_LIBRARY_FRAGMENT(mhc_megatron, m) {
  m.def("cpu_isa() -> str", &mhc::cpu_isa);
  m.def("set_cpu_isa(str level) -> ()", &mhc::set_cpu_isa);
  m.def("cpu_isa_levels() -> str[]", &mhc::cpu_isa_levels);
}

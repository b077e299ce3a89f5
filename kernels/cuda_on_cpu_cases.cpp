// Small kernels whose behaviour under cuda_on_cpu.h is known, for the tests of the execution model
// itself (tests/test_cuda_on_cpu.py): torch.ops.mhc_cuda_on_cpu.model_case(name) runs one launch of
// 2 blocks of 256 threads and returns what it wrote ([2, 256] floats, NaN where nothing was).
#include "cuda_on_cpu.h"

#include <ATen/ATen.h>

#include <string>

namespace {

constexpr int kThreads = 256;

// Each thread stages its number in shared memory and reads its neighbour's, with or without the
// barrier between the two.
__global__ void neighbour_kernel(float* out, bool barrier) {
  unsigned char* shared = ::cuda_on_cpu::dynamic_shared();
  float* staged = reinterpret_cast<float*>(shared);
  staged[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = staged[(threadIdx.x + 1) % blockDim.x];
}

// Threads 128 and above return before the barrier the others wait at.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 128) return;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
}

// The sum of the lane numbers of each warp by shuffles (496 in lane 0); with `lane_returns`, lane 5
// returns before the first shuffle.
__global__ void warp_sum_kernel(float* out, bool lane_returns) {
  const unsigned lane = threadIdx.x % 32;
  if (lane_returns && lane == 5) return;
  float v = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

at::Tensor model_case(const std::string& name) {
  auto out = at::full({2, kThreads}, NAN, at::kFloat);
  float* data = out.data_ptr<float>();
  const size_t shared = kThreads * sizeof(float);
  if (name == "neighbour" || name == "neighbour without barrier") {
    const bool barrier = name == "neighbour";
    ::cuda_on_cpu::launch(dim3(2), dim3(kThreads), shared, [&] { neighbour_kernel(data, barrier); });
  } else if (name == "divergent barrier") {
    ::cuda_on_cpu::launch(dim3(2), dim3(kThreads), 0, [&] { divergent_barrier_kernel(data); });
  } else if (name == "warp sum" || name == "warp sum, a lane returned") {
    const bool lane_returns = name != "warp sum";
    ::cuda_on_cpu::launch(dim3(2), dim3(kThreads), 0, [&] { warp_sum_kernel(data, lane_returns); });
  } else {
    TORCH_CHECK(false, "unknown model case '", name, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mhc_cuda_on_cpu, m) { m.def("model_case(str name) -> Tensor", &model_case); }

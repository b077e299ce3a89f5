// The CUDA kernel language on the CPU, for running mhc_cuda.cu's kernels where there is no GPU
// (tests/test_cuda_on_cpu.py). Execution model:
//  - a launch runs its blocks one after another; a block's threads are fibers (ucontext) on the
//    calling thread, each running until it reaches a barrier, a warp shuffle or its end, in an
//    order chosen per launch (`set_thread_order`: forward, reverse, or shuffled anew between every
//    two barriers), so that a missing barrier changes results;
//  - `__syncthreads()` releases the block once every thread has reached it, and fails the launch
//    if some threads reached it while others returned (a divergent barrier) or if the threads wait
//    at different barriers;
//  - `__shfl_down_sync` exchanges values through a per-warp buffer: every lane writes its value,
//    the warp waits until all 32 lanes have, then each reads lane + offset (its own value past the
//    warp's end); only the full mask is supported;
//  - static `__shared__` variables are the kernel's statics (one copy, which the blocks use in
//    turn); dynamic shared memory is one buffer per block, filled with 0xff bytes (NaN for floats)
//    before the block starts, so that a read of shared memory nothing wrote shows.
// Errors of the model (a divergent barrier, a partial warp) raise from the launch with the block,
// the threads and what they wait at.
#pragma once

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_on_cpu {

constexpr int kWarpSize = 32;

// The running launch's view, for the kernel's built-in variables and intrinsics.
const dim3& thread_index();
const dim3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared();
void sync_threads();
// Lane `lane + offset`'s `bytes` bytes of this shuffle (one value per lane), into `value`.
void shuffle_down(void* value, int bytes, unsigned offset);

// Runs `kernel` (the body of one thread) over `grid` blocks of `block` threads.
void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel);

// Registers `set_thread_order(str order) -> ()` in the op library `m`.
void define_controls(torch::Library& m);

template <typename T>
T shfl_down_sync(unsigned mask, T value, unsigned offset) {
  static_assert(sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
  TORCH_CHECK(mask == 0xffffffffu, "cuda_on_cpu: __shfl_down_sync supports the full mask only, got ", mask);
  shuffle_down(&value, sizeof(T), offset);
  return value;
}

}  // namespace cuda_on_cpu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::cuda_on_cpu::thread_index())
#define blockIdx (::cuda_on_cpu::block_index())
#define blockDim (::cuda_on_cpu::block_dim())
#define gridDim (::cuda_on_cpu::grid_dim())
#define __syncthreads() ::cuda_on_cpu::sync_threads()
#define __shfl_down_sync(mask, value, offset) ::cuda_on_cpu::shfl_down_sync(mask, value, offset)
using std::max;
using std::min;

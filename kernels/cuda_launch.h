// What mhc_cuda.cu needs from CUDA beyond the kernel language: launching a kernel, the device
// guard, dynamic shared memory and the ops' registration. Under nvcc these are CUDA's own; with
// MHC_CUDA_ON_CPU the same source compiles as C++ and its kernels run on the CPU through
// cuda_on_cpu.h (kernels/cuda_on_cpu.cpp builds it so).
#pragma once

#ifdef MHC_CUDA_ON_CPU
#include "cuda_on_cpu.h"

// kernel<<<grid, block, shared_bytes, stream>>>(args...), run on the CPU before it returns.
#define MHC_LAUNCH(kernel, grid, block, shared_bytes, ...) \
  ::cuda_on_cpu::launch(dim3(grid), dim3(block), shared_bytes, [&] { kernel(__VA_ARGS__); })
#define MHC_DEVICE_GUARD(tensor) (void)(tensor)
// The block's dynamic shared memory (launch argument shared_bytes), as bytes aligned to 16.
#define MHC_DYNAMIC_SHARED(name) unsigned char* name = ::cuda_on_cpu::dynamic_shared()
// The ten ops as their own library, `torch.ops.mhc_cuda_on_cpu`, taking CPU tensors.
#define MHC_REGISTER_CUDA_KERNELS TORCH_LIBRARY(mhc_cuda_on_cpu, m) { \
  MHC_FOR_EACH_KERNEL(MHC_DEFINE_ON_CPU, m)                           \
  ::cuda_on_cpu::define_controls(m);                                   \
}
#define MHC_DEFINE_ON_CPU(m, op) m.def(#op, &mhc::op);

#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define MHC_LAUNCH(kernel, grid, block, shared_bytes, ...)                                    \
  do {                                                                                         \
    kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                            \
  } while (0)
#define MHC_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())
#define MHC_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#define MHC_REGISTER_CUDA_KERNELS MHC_REGISTER_KERNELS(CUDA)
#endif

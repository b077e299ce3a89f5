// mhc_cuda.cu compiled as C++: its kernels run on the CPU through cuda_on_cpu.h, registered as
// torch.ops.mhc_cuda_on_cpu (tests/test_cuda_on_cpu.py). Not a fast path: a test of the CUDA code.
#define MHC_CUDA_ON_CPU 1
#include "mhc_cuda.cu"

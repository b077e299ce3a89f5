// The one exported symbol of a CPU level library: the table of its kernels (cpu_kernels.h).
#include "cpu_kernels.h"

#define MHC_STRINGIFY(x) #x
#define MHC_LEVEL_NAME(x) MHC_STRINGIFY(x)

extern "C" __attribute__((visibility("default"))) const mhc::CpuKernels* mhc_cpu_kernels() {
  namespace cpu = mhc::cpu;
  static const mhc::CpuKernels table{
      mhc::kCpuKernelsAbi, MHC_LEVEL_NAME(MHC_CPU_LEVEL), &cpu::sinkhorn_fwd, &cpu::sinkhorn_bwd,
      &cpu::mappings_fwd,  &cpu::mappings_bwd,            &cpu::mappings_pre_fwd, &cpu::mappings_pre_bwd,
      &cpu::pre_fwd,       &cpu::pre_bwd,                 &cpu::post_res_fwd,     &cpu::post_res_bwd,
      &cpu::hc_mappings_pre_fwd, &cpu::hc_mappings_pre_bwd, &cpu::post_res_mappings_pre_fwd,
      &cpu::post_res_mappings_pre_bwd,
  };
  return &table;
}

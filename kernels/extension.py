"""What setup.py builds: the mHC kernels as ``mhc_megatron._C`` plus one CPU library per level.

``MHC_BUILD`` decides:
  auto  (default) CUDA + CPU when torch is a CUDA build and nvcc is found (CUDA_HOME), else CPU only;
  cpu   the C++ (OpenMP) kernels only;
  cuda  C++ and CUDA kernels, an error if torch has no CUDA or no nvcc is found;
  none  nothing: the package runs on the PyTorch reference operators.
``MAX_JOBS`` limits parallel compile jobs (torch's BuildExtension reads it). The CUDA kernels are built
for the GPUs the planner lists, those the toolkit (nvcc) supports: A100 (8.0), H100/H200 (9.0a) and
B200 (10.0, CUDA 12.8 and later); ``TORCH_CUDA_ARCH_LIST`` replaces that list (nvcc takes about a
minute per arch for mhc_cuda.cu on a 2-core host, so ``9.0a`` alone builds it in a third of the time).

``mhc_megatron._cuda_on_cpu`` is mhc_cuda.cu's kernels compiled as C++ for the CPU execution model of
kernels/cuda_on_cpu.h (tests/test_cuda_on_cpu.py runs them), built with the others.

The CPU kernels (mhc_cpu_*.cpp, cpu_level.cpp) are compiled once per instruction-set level into
``mhc_megatron._cpu_<level>``, and ``_C`` (cpu_dispatch.cpp) loads the one it picks at run time
(``MHC_CPU_ISA`` forces one). Nothing is built for the build machine's own CPU (no
``-march=native``), so a virtual environment built on one machine runs on any other of the same
architecture.
"""

from __future__ import annotations

import copy
import os
import platform
import re
import shutil
import subprocess

CHOICES = ("auto", "cpu", "cuda", "none")
SOURCES = ["kernels/registration.cpp", "kernels/cpu_dispatch.cpp"]
CPU_KERNEL_SOURCES = [f"kernels/{name}.cpp" for name in ("mhc_cpu_mappings", "mhc_cpu_pre", "mhc_cpu_post_res", "mhc_cpu_hc",
                                                         "cpu_level")]
CUDA_SOURCES = ["kernels/mhc_cuda.cu"]
# (arch, the first CUDA toolkit that compiles for it): A100, H100/H200, B200.
CUDA_ARCHS = (("8.0", (11, 0)), ("9.0a", (12, 0)), ("10.0", (12, 8)))
# The CUDA kernels compiled as C++ and run on the CPU (kernels/cuda_on_cpu.h): a test of the CUDA
# code where there is no GPU, built with every kernel build. -O1: it runs at test sizes only, and
# mhc_cuda_on_cpu.cpp compiles in 18 s instead of -O3's 26 s. nvcc's CUDA does not warn where the kernels compare
# threadIdx (unsigned) with an int or ask to unroll a loop; g++ would, once per instantiation.
CUDA_ON_CPU_SOURCES = [f"kernels/{name}.cpp" for name in ("mhc_cuda_on_cpu", "cuda_on_cpu", "cuda_on_cpu_cases")]

# Instruction-set levels of the CPU kernels and their compiler flags; the CPU features each needs
# at run time are checked in cpu_dispatch.cpp. Other architectures get the portable level only.
X86_CPU_LEVELS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
}
OPTIMIZE = ["-O3", "-g0"]  # no debug info: it triples the compile time of the unrolled kernels
# Each level library exports only its table: no inline function compiled for a higher level can
# stand in for another library's copy.
HIDDEN = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]


def cpu_levels() -> dict[str, list[str]]:
    """The CPU kernel levels built on this architecture, with their flags."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        return X86_CPU_LEVELS
    return {"scalar": []}


def _set_cuda_home() -> None:
    """Set CUDA_HOME, when unset, to a toolkit folder that has the CUDA runtime library.

    torch guesses the folder above nvcc's; for a wrapper such as /usr/local/bin/nvcc that is
    /usr/local, which has no lib64/libcudart, and linking fails. Then use /usr/local/cuda.
    """
    nvcc = shutil.which("nvcc")
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not os.path.isdir(os.path.join(guess, "lib64")) and os.path.isdir("/usr/local/cuda/lib64"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def default_cuda_archs(toolkit: tuple[int, int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for a CUDA toolkit of version ``toolkit``: the ``CUDA_ARCHS`` it supports."""
    return ";".join(arch for arch, first in CUDA_ARCHS if toolkit >= first)


def toolkit_version(cuda_home: str) -> tuple[int, int]:
    """(major, minor) of the nvcc in ``cuda_home``, from ``nvcc --version`` ("release 13.0, ...")."""
    output = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                            text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    if match is None:
        raise SystemExit(f"cannot read the CUDA version from nvcc --version:\n{output}")
    return int(match[1]), int(match[2])


def extension_modules() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for setuptools.setup, following ``MHC_BUILD``."""
    choice = os.environ.get("MHC_BUILD", "auto")
    if choice not in CHOICES:
        raise SystemExit(f"MHC_BUILD must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "none":
        return [], {}
    _set_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_ready = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "cuda" and not cuda_ready:
        raise SystemExit(
            f"MHC_BUILD=cuda needs a CUDA build of torch and nvcc; got torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    if choice == "cpu" or not cuda_ready:
        dispatcher = CppExtension("mhc_megatron._C", SOURCES, libraries=["dl"], extra_compile_args={"cxx": OPTIMIZE})
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_cuda_archs(toolkit_version(CUDA_HOME)))
        dispatcher = CUDAExtension(
            "mhc_megatron._C", SOURCES + CUDA_SOURCES,
            define_macros=[("MHC_WITH_CUDA", "1")], libraries=["dl"],
            extra_compile_args={"cxx": OPTIMIZE, "nvcc": ["-O3"]},
        )
    levels = [
        CppExtension(
            f"mhc_megatron._cpu_{level}", CPU_KERNEL_SOURCES,
            define_macros=[("MHC_CPU_LEVEL", level)],
            extra_compile_args={"cxx": OPTIMIZE + HIDDEN + ["-fopenmp"] + flags},
            extra_link_args=["-fopenmp"],
        )
        for level, flags in cpu_levels().items()
    ]
    cuda_on_cpu = CppExtension("mhc_megatron._cuda_on_cpu", CUDA_ON_CPU_SOURCES,
                               extra_compile_args={"cxx": ["-O1", "-g0", "-Wno-sign-compare", "-Wno-unknown-pragmas"]})

    class BuildKernels(BuildExtension):
        """torch's BuildExtension, building the libraries side by side (threads, each running its
        own ninja), each in a temporary folder of its own: the level libraries compile the same
        sources with other flags and must not share their object files."""

        def finalize_options(self):
            super().finalize_options()
            self.parallel = self.parallel or len(self.extensions)

        def build_extension(self, ext):
            builder = copy.copy(self)  # the threads must not share build_temp
            builder.build_temp = os.path.join(self.build_temp, ext.name)
            BuildExtension.build_extension(builder, ext)

    return [dispatcher, *levels, cuda_on_cpu], {"build_ext": BuildKernels}

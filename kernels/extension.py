"""What setup.py builds: the mHC kernels as the extension ``mhc_megatron._C``.

``MHC_BUILD`` decides:
  auto  (default) CUDA + CPU when torch is a CUDA build and nvcc is found (CUDA_HOME), else CPU only;
  cpu   the C++ (OpenMP) kernels only;
  cuda  C++ and CUDA kernels, an error if torch has no CUDA or no nvcc is found;
  none  nothing: the package runs on the PyTorch reference operators.
``MAX_JOBS`` limits parallel compile jobs (torch's BuildExtension reads it); ``TORCH_CUDA_ARCH_LIST``
overrides the default CUDA arch list ``9.0a`` (H100).
"""

from __future__ import annotations

import os
import shutil

CHOICES = ("auto", "cpu", "cuda", "none")
SOURCES = ["kernels/registration.cpp", "kernels/mhc_cpu.cpp"]
CUDA_SOURCES = ["kernels/mhc_cuda.cu"]
DEFAULT_CUDA_ARCHS = "9.0a"


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
    cxx = ["-O3", "-march=native", "-fopenmp"]
    if choice == "cpu" or not cuda_ready:
        module = CppExtension("mhc_megatron._C", SOURCES, extra_compile_args={"cxx": cxx},
                              extra_link_args=["-fopenmp"])
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        module = CUDAExtension(
            "mhc_megatron._C", SOURCES + CUDA_SOURCES,
            define_macros=[("MHC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return [module], {"build_ext": BuildExtension}

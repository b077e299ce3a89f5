import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

# The C++/CUDA kernels: kernels/extension.py reads MHC_BUILD (auto | cpu | cuda | none).
_spec = importlib.util.spec_from_file_location("mhc_extension", Path(__file__).parent / "kernels/extension.py")
_extension = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_extension)
ext_modules, cmdclass = _extension.extension_modules()

setup(
    name="mhc_megatron",
    version="0.1.0",
    packages=find_packages(include=["mhc_megatron", "mhc_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.11",
        "megatron-core>=0.19.2",
        "psutil",  # megatron's distributed checkpointing
        "pyyaml",  # configs
        "tensorboard",  # metrics
        "tqdm",  # progress
        "matplotlib",  # mhc-compare and mhc-study plots
    ],
    extras_require={"test": ["pytest", "pytest-xdist"], "wandb": ["wandb"], "deepspeed": ["deepspeed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "mhc-train=mhc_megatron.training.cli:main",
            "mhc-preprocess=mhc_megatron.data.preprocess:main",
            "mhc-compare=mhc_megatron.compare.cli:main",
            "mhc-study=mhc_megatron.study.cli:main",
            "mhc-convert=mhc_megatron.convert.cli:main",
            "mhc-bench=mhc_megatron.bench.cli:main",
            "mhc-plan=mhc_megatron.plan.cli:main",
        ]
    },
)

from setuptools import find_packages, setup

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
        "matplotlib",  # mhc-compare plots
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "mhc-train=mhc_megatron.train:main",
            "mhc-preprocess=mhc_megatron.data.preprocess:main",
            "mhc-compare=mhc_megatron.compare.cli:main",
        ]
    },
)

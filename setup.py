from setuptools import find_packages, setup

setup(
    name="mhc_megatron",
    version="0.1.0",
    packages=find_packages(include=["mhc_megatron", "mhc_megatron.*"]),
    python_requires=">=3.12",
    install_requires=["torch>=2.11", "megatron-core>=0.19.2", "psutil"],
    extras_require={"test": ["pytest"]},
)

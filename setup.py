from setuptools import find_packages, setup

setup(
    name="nstm-kernels",
    version="0.2.0",
    description="Fused kernels and PyTorch layers for the Neural State Transition Machine (NSTM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["nstm_kernels", "nstm_kernels.*", "nstm", "nstm.*"])
    + ["nstm_kernels.csrc"],
    # the CUDA step's sources travel inside the package (nstm_kernels/csrc in a wheel); the
    # extension is built from them on first use (nstm_kernels/cuda.py)
    package_dir={"nstm_kernels.csrc": "csrc"},
    package_data={"nstm_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "*.md"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        # Triton fast paths (CUDA tensors, or TRITON_INTERPRET=1 on the CPU)
        "triton": ["triton>=3.0"],
        # progress bars and plots for the demo, the training CLI and the benchmarks
        "tools": ["tqdm>=4.60", "matplotlib>=3.5"],
        "dev": ["pytest", "pytest-benchmark", "ninja", "tqdm>=4.60", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["nstm-demo=nstm.demo:main", "nstm-train=nstm.train:cli"]},
)

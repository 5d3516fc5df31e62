from setuptools import find_packages, setup

# transformers 5 is the first release whose model API nstm.hf is written against
HF = ["transformers>=5.0", "safetensors"]
PLOTS = ["matplotlib>=3.5"]

setup(
    name="nstm-kernels",
    version="0.2.0",
    description="Fused kernels and PyTorch layers for the Neural State Transition Machine (NSTM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["nstm_kernels", "nstm_kernels.*", "nstm", "nstm.*"])
    + ["nstm_kernels.csrc"],
    # the C++ sources travel inside the package (nstm_kernels/csrc in a wheel): the CUDA step and
    # the CPU operator are compiled from them on first use (nstm_kernels/cuda.py, cpu.py); without
    # a compiler the package runs its PyTorch paths
    package_dir={"nstm_kernels.csrc": "csrc"},
    package_data={"nstm_kernels.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "*.md"]},
    python_requires=">=3.9",
    # tqdm: the progress bars of the console scripts (nstm-train, nstm-demo) and the data fetch
    install_requires=["torch>=2.1", "numpy", "tqdm>=4.60"],
    extras_require={
        # Triton fast paths (CUDA tensors, or TRITON_INTERPRET=1 on the CPU)
        "triton": ["triton>=3.0"],
        # Hugging Face wrappers and safetensors checkpoints (nstm.hf)
        "hf": HF,
        # plots: nstm.plots, the demo's figures, the benchmarks' PNGs
        "tools": PLOTS,
        # the test suite and the linter (`make test` installs requirements-dev.txt, the same set pinned)
        "dev": ["pytest", "pytest-benchmark", "ninja", "ruff==0.17.6", *PLOTS, *HF],
    },
    entry_points={"console_scripts": [
        "nstm-demo=nstm.demo:cli",
        "nstm-train=nstm.train:cli",
        "nstm-sample=nstm.sample:main",
        "nstm-study=nstm.study:main",
    ]},
)

from setuptools import setup

setup(
    name="nsa-tilelang",
    version="0.1.0",
    description="Native Sparse Attention (arXiv 2502.11089) in TileLang: kernels, golden reference, layer",
    packages=["kernels", "reference", "nsa_module"],
    python_requires=">=3.10",
    install_requires=[
        "tilelang==0.1.15",  # pinned: its API moves fast (the dev environment's GPU bundle, outside this repo, pins the same)
        "torch>=2.4",
        "einops",
        "numpy",
        "matplotlib",
        "tqdm",  # progress bars of the examples' training and decoding loops
    ],
    extras_require={"test": ["pytest"]},
)

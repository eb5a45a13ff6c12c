import os
import shutil

import pytest
import torch

from kernels.common import SM90_TARGET


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_compile = pytest.mark.skip(reason="needs nvcc to compile TileLang kernels for sm_90a")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "compile" in item.keywords and not has_nvcc:
            item.add_marker(skip_compile)


@pytest.fixture
def sm90_target(monkeypatch):
    """Compile for Hopper whatever this machine has (TileLang reads the variable at compile time)."""
    monkeypatch.setenv("TILELANG_DEFAULT_TARGET", SM90_TARGET)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel fails to write fails the comparison."""
    import nsa_module.common

    monkeypatch.setattr(nsa_module.common, "POISON_OUTPUTS", True)

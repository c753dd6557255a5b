"""Shared fixtures: a tiny random LLaMA (seconds) and the real default model (pulled once).

ASRKF_EDGE_TEST_GPU_LAYERS=-1 runs the suite with every layer (and the KV cache) on the GPU, where
llama.cpp was built with one; CI leaves it unset (CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_tiny_llama  # noqa: E402

from asrkf_edge import Engine  # noqa: E402
from asrkf_edge.models import default_model_path  # noqa: E402

GPU_LAYERS = int(os.environ.get("ASRKF_EDGE_TEST_GPU_LAYERS", "0"))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny(tiny_path: Path):
    with Engine.load(tiny_path, n_gpu_layers=GPU_LAYERS) as eng:
        yield eng


@pytest.fixture(scope="session")
def tiny10(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model with more layers than the tracker scores (8), so a split capture leaves some out."""
    with Engine.load(write_tiny_llama(tmp_path_factory.mktemp("tiny10") / "tiny10.gguf", n_layer=10),
                     n_gpu_layers=GPU_LAYERS) as eng:
        yield eng


@pytest.fixture(scope="session")
def real_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def real(real_path: Path):
    with Engine.load(real_path, n_gpu_layers=GPU_LAYERS) as eng:
        yield eng

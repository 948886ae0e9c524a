"""Shared fixtures.  Tests on real data use the materialised datasets (``make data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    return Path(os.environ.get("MIXDEFENSE_DATA", REPO / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding the real datasets; the test is skipped (with a reason) without it."""
    root = _data_root()
    if not (root / "MNIST" / "raw").exists():
        pytest.skip(f"real datasets not materialised under {root} (run `make data`)")
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small tensors gain nothing from two, and on a shared 2-core
    CPU two OpenMP threads that wait for each other make a tiny training step up to 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _offline_wandb():
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield

"""Shared fixtures: where the real datasets live (never downloaded in tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    env = os.environ.get("LRDEPLOY_DATA")
    for candidate in (env, REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root holding mnist/, fashion-mnist/, ... (env LRDEPLOY_DATA, else ../shared/data)."""
    root = _data_root()
    if root is None:
        pytest.skip("no real data: set LRDEPLOY_DATA or place shared/data beside the repository")
    return root


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on a 2-core CI box under two xdist workers: one torch thread each, or the two workers'
    thread pools oversubscribe the cores (measured: the Cuttlefish/Maestro fixture of test_cli_methods 15 s
    -> 6 s, bf16 autocast training 11 s -> 6 s). Subprocesses keep torch's default."""
    torch.set_num_threads(1)
    yield

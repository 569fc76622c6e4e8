"""Shared fixtures. ../shared sits beside the checkout (in CI too); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    # Tests never reach the network.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found")
    return SHARED


@pytest.fixture(scope="session")
def realct_dir(shared_dir: Path) -> Path:
    d = shared_dir / "data" / "realct-mini"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


def fsct_env() -> dict[str, str]:
    """Environment for subprocess runs of `python -m fsct`: offline W&B, one thread per process."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env

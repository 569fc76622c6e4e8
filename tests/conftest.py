"""Shared fixtures. Everything a test reads is in the repo: a user's clone has nothing beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALCT = REPO / "tests" / "data" / "realct"  # 10 real CT slices in the challenge layout (see its README)
SEED_BASELINE = REPO / "tests" / "fixtures" / "seed_baseline.py"  # the seed notebook as a script


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    # Tests never reach the network.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def realct_dir() -> Path:
    """`X_train/images/0..9.png` + `Y_train.csv.gz`: 0..7 labelled, 8 and 9 unlabelled."""
    return REALCT


def fsct_env() -> dict[str, str]:
    """Environment for subprocess runs of `python -m fsct`: offline W&B, one thread per process."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def fsct(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsct", *args], capture_output=True, text=True,
                          env=fsct_env(), cwd=cwd, timeout=300)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    r = fsct("synth", "--out", str(out), "--n-train", "14", "--n-test", "4", "--labelled-fraction", "0.6",
             "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def shards(synth: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "synth"
    r = fsct("shard", "--images", str(synth / "X_train" / "images"), "--labels", str(synth / "Y_train.csv"),
             "--out", str(out), "--shard-size", "3", "--val-fraction", "0.25", "--workers", "2")
    assert r.returncode == 0, r.stderr
    r = fsct("shard", "--images", str(synth / "X_test" / "images"), "--out", str(out), "--split", "test")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def stream_shards(synth: Path, tmp_path_factory) -> Path:
    """The synth set in tars of 2 slices, with superpixels: 3 train tars (not a multiple of 2 ranks), 3
    unlabelled ones for superpixel episodes, and 2 test tars."""
    out = tmp_path_factory.mktemp("stream") / "synth"
    r = fsct("shard", "--images", str(synth / "X_train" / "images"), "--labels", str(synth / "Y_train.csv"),
             "--out", str(out), "--shard-size", "2", "--val-fraction", "0.25", "--workers", "2", "--superpixels")
    assert r.returncode == 0, r.stderr
    r = fsct("shard", "--images", str(synth / "X_test" / "images"), "--out", str(out), "--split", "test",
             "--shard-size", "2")
    assert r.returncode == 0, r.stderr
    return out

"""Launch conventions: accelerate's precision setting, device checks before any work, trackers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsct.errors import FsctError
from fsct.launch import check_devices, image_panel_due, log_with, resolve_precision
from tests.conftest import REPO, fsct_env

DEMO = str(REPO / "configs" / "demo.yaml")


def test_auto_precision_defers_to_accelerate():
    assert resolve_precision("auto", cuda=True, env={}) == "bf16"
    assert resolve_precision("auto", cuda=False, env={}) == "no"
    assert resolve_precision("auto", cuda=True, env={"ACCELERATE_MIXED_PRECISION": "fp16"}) == "fp16"
    assert resolve_precision("auto", cuda=False, env={"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert resolve_precision("no", cuda=True, env={"ACCELERATE_MIXED_PRECISION": "bf16"}) == "no"


def test_device_checks_without_cuda():
    assert check_devices(cuda=True, env={"WORLD_SIZE": "8"}) == {}
    assert check_devices(cuda=False, env={}) == {}
    assert check_devices(cuda=False, env={"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1"}, cpus=2) == {}
    # N lone runs into one dir otherwise: the CPU backend is switched on
    assert check_devices(cuda=False, env={"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, cpus=2) == {
        "ACCELERATE_USE_CPU": "true"}
    with pytest.raises(FsctError, match="8 processes on a machine without GPUs"):
        check_devices(cuda=False, env={"WORLD_SIZE": "8", "LOCAL_RANK": "0"}, cpus=2)
    with pytest.raises(FsctError, match="asks for GPUs"):
        check_devices(cuda=False, env={"CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "bf16"})


def test_image_every_is_a_period():
    due, last = [], -1
    for step in range(5, 51, 5):  # validations every 5 steps, panels every 20
        if image_panel_due(step, last, 20):
            due.append(step)
            last = step
    assert due == [5, 25, 45]
    assert not image_panel_due(5, -1, 0)


def test_missing_tracker_package_is_one_line(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FsctError, match="pip install mlflow"):
        log_with("mlflow")
    assert log_with("none") is None


def _train(out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fsct", "train", "--config", DEMO, f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=fsct_env() | env, timeout=300)


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "64", "RANK": "0", "LOCAL_RANK": "0"}, "64 processes on a machine without GPUs"),
    ({"CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}, "asks for GPUs"),
])
def test_gpu_launch_on_cpu_refuses_in_one_line(tmp_path: Path, env: dict[str, str], expected: str):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without GPUs")
    out = tmp_path / "run"
    r = _train(out, env)
    assert r.returncode == 1 and expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_other_ranks_stop_silently(tmp_path: Path):
    r = _train(tmp_path / "run", {"WORLD_SIZE": "64", "RANK": "3", "LOCAL_RANK": "3"})
    assert r.returncode == 1 and r.stderr.strip() == ""


@pytest.mark.slow
def test_wandb_summary_holds_best_and_model_artifact(shards: Path, tmp_path: Path):
    out = tmp_path / "wb"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    r = _train(out, env, f"data.shards={shards}", "data.image_size=64", "model.feature_dim=32",
               "episodes.n_way=2", "episodes.k_shot=1", "episodes.n_query=1", "train.max_steps=4",
               "train.val_every=2", "train.val_episodes=2", "train.tracker=wandb", "train.log_model=true",
               "train.best_metric=val/ari_fg", "train.image_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(run_file)
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(v["val/ari_fg"] for v in vals if "val/ari_fg" in v)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(i.nested_key) or i.key: i.value_json for i in r.summary.update})
    assert json.loads(summary["val/ari_fg"])["max"] == pytest.approx(best)  # the best, not the last
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert len(arts) == 1 and arts[0].type == "model" and "best" in arts[0].aliases
    assert {e.path for e in arts[0].manifest.contents} == {"model.safetensors", "config.yaml"}
    assert not any(r.WhichOneof("record_type") == "history" and any(
        "queries" in (i.key or "/".join(i.nested_key)) for i in r.history.item) for r in records)


def wandb_records(run_file: Path) -> list:
    """Every record of an offline W&B run (LevelDB log: a 7-byte header, then 32 KiB blocks of
    [crc u32][length u16][type u8][data] records, each a protobuf)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    b = run_file.read_bytes()
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(b):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", b[pos:pos + 7])
        data, pos = b[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out

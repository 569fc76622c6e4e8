"""The trainer for real: two processes over gloo, SIGTERM + resume, offline W&B, and the episode stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsct.config import load_config
from fsct.data.episodes import EpisodeSampler, EpisodeStream, episode_batches
from fsct.data.pool import load_split, rank_subset
from tests.conftest import REPO, fsct_env

TINY = ["data.image_size=64", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2"]


def tiny_cfg(shards: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "demo.yaml",
                       [f"data.shards={shards}", f"train.output_dir={out}", *TINY, *extra])


def train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fsct", "train", "--config", str(REPO / "configs" / "demo.yaml"),
            f"data.shards={shards}", f"train.output_dir={out}", *TINY, *extra]


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """History rows of an offline W&B run, read straight from its .wandb file (LevelDB log format: a
    7-byte header, then 32 KiB blocks of [crc u32][length u16][type u8][data] records, each a protobuf)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    b = run_file.read_bytes()
    assert b[:4] == b":W&B"
    rows, pos, buf = [], 7, b""
    while pos + 7 <= len(b):
        if 32768 - pos % 32768 < 7:  # block trailer padding
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
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


def load_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rank_json(out: Path, r: int) -> dict:
    return json.loads((out / f"rank{r}.json").read_text())


@pytest.mark.slow
def test_two_process_ddp(shards: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = fsct_env() | {"ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29500 + os.getpid() % 1000), "-m", "fsct", *train_cmd(shards, out, "train.max_steps=4",
                                                                    "train.val_every=2", "train.val_episodes=2",
                                                                    "train.ema_decay=0.9")[3:]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = rank_json(out, 0), rank_json(out, 1)
    assert a["params"] == b["params"]  # DDP kept the replicas identical
    assert a["episodes"] == b["episodes"] == 4
    assert a["episodes_digest"] != b["episodes_digest"]  # each rank drew its own episodes
    assert not set(a["pool_keys"]) & set(b["pool_keys"])  # from its own shards
    assert (out / "model.safetensors").is_file() and (out / "DONE").is_file()
    assert "step 4/4" in r.stdout
    # the weight average under DDP: the main process wrote it as the model file and into the checkpoint
    last = out / "checkpoints" / "step_00000004"
    assert_same_tensors(load_file(last / "ema.safetensors"), load_file(out / "model.safetensors"))


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(shards: Path, tmp_path: Path):
    """With the weight average on (train.ema_decay): the average resumes too, and it is the model file."""
    steps = ["train.max_steps=24", "train.save_every=0", "train.ema_decay=0.9"]
    ref = tmp_path / "ref"
    r = subprocess.run(train_cmd(shards, ref, *steps), capture_output=True, text=True, env=fsct_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(shards, out, *steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=fsct_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(lines)
    log = "".join(lines)
    cut_at = int((out / "PREEMPTED").read_text())
    assert 3 <= cut_at < 24 and f"preempted: checkpoint saved at step {cut_at}" in log
    assert not (out / "DONE").exists()

    r = subprocess.run(train_cmd(shards, out, *steps) + ["--resume", "auto"], capture_output=True,
                       text=True, env=fsct_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{cut_at:08d}'} at step {cut_at}" in r.stdout
    assert f"step {cut_at + 1}/24" in r.stdout and "step 1/24" not in r.stdout
    assert rank_json(out, 0)["state"] == rank_json(ref, 0)["state"]  # weights and BN statistics
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    model, last = load_file(ref / "model.safetensors"), ref / "checkpoints" / "step_00000024"
    assert_same_tensors(load_file(out / "model.safetensors"), model)  # the average resumed exactly
    assert_same_tensors(load_file(last / "ema.safetensors"), model)
    trained = load_file(last / "model.safetensors")  # Accelerate's state: the trained weights, not the average
    assert trained.keys() == model.keys() and not all(torch.equal(trained[k], model[k]) for k in model)


def test_a_resumed_run_can_turn_the_weight_average_on(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    r = subprocess.run(train_cmd(shards, out, "train.max_steps=3"), capture_output=True, text=True,
                       env=fsct_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(train_cmd(shards, out, "train.max_steps=5", "train.ema_decay=0.9") + ["--resume", "auto"],
                       capture_output=True, text=True, env=fsct_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000003 holds no weight average: it starts here" in r.stdout
    last = out / "checkpoints" / "step_00000005"
    assert_same_tensors(load_file(last / "ema.safetensors"), load_file(out / "model.safetensors"))


@pytest.mark.slow
def test_preempt_file_and_offline_wandb(shards: Path, tmp_path: Path):
    out = tmp_path / "wb"
    env = fsct_env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    extra = ["train.tracker=wandb", "train.max_steps=6", "train.val_every=3", "train.val_episodes=2",
             "train.image_every=3", "train.project=fsct-test"]
    r = subprocess.run(train_cmd(shards, out, *extra), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    history = wandb_history(next(runs[0].glob("run-*.wandb")))
    assert [int(row["_step"]) for row in history] == [1, 2, 3, 4, 5, 6]
    for key in ("train/loss", "train/ce", "train/par", "train/lr", "train/grad_norm", "perf/episodes_per_s"):
        assert all(key in row for row in history), key
    assert all(0 < float(row["train/loss"]) < 20 for row in history)
    val_rows = [row for row in history if "val/miou" in row]
    assert [int(r["_step"]) for r in val_rows] == [3, 6] and all("val/ari_fg" in r for r in val_rows)
    assert json.loads(val_rows[0]["val/queries/_type"]) == "images/separated"
    media = runs[0] / "files" / "media" / "images"
    assert len(list((media / "val").glob("queries_3_*.png"))) >= 1
    assert len(list((media / "mask" / "val").glob("queries_3_*.mask.png"))) >= 2  # predicted + true masks

    # a PREEMPT file (what the SLURM script touches) stops a resumed run at once, in the same W&B run
    (out / "PREEMPT").touch()
    r = subprocess.run(train_cmd(shards, out, *extra[:-1], "train.max_steps=12") + ["--resume", "auto"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preempted: checkpoint saved at step 7" in r.stdout
    assert not (out / "PREEMPT").exists() and (out / "PREEMPTED").read_text().strip() == "7"
    assert (out / "wandb_id.txt").read_text().strip() == run_id


def test_rank_subsets_partition_the_split(shards: Path):
    info = json.loads((shards / "index.json").read_text())["splits"]["train"]
    parts = [rank_subset(shards, "train", r, 2) for r in range(2)]
    keys = [set(load_split(shards, "train", names, 32, ks).keys) for names, ks in parts]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(info["samples"])
    many = [rank_subset(shards, "train", r, 16) for r in range(16)]  # more ranks than shards: split by key
    got = [k for _, ks in many for k in ks]
    assert sorted(got) == sorted(info["samples"])


def test_stream_resumes_exactly_and_workers_do_not_duplicate(shards: Path, tmp_path: Path):
    cfg = tiny_cfg(shards, tmp_path, "train.max_steps=8")
    pool = load_split(shards, "train", size=64)
    sampler = EpisodeSampler(pool, cfg.episodes, cfg.train.seed, rank=0)
    cpu = torch.device("cpu")
    full = list(episode_batches(cfg, sampler, pool, None, 0, cpu))
    resumed = list(episode_batches(cfg, sampler, pool, None, 5, cpu))
    assert len(full) == 8 and len(resumed) == 3
    for (ea, a), (eb, b) in zip(full[5:], resumed, strict=True):
        assert [e.support.tolist() for e in ea] == [e.support.tolist() for e in eb]
        assert torch.equal(a.s_img, b.s_img) and torch.equal(a.q_lbl, b.q_lbl)

    stream = EpisodeStream(sampler, pool, cfg.augment, 0, 8)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = list(loader)
    assert [s for s, _ in got] == list(range(8))  # in order, each step exactly once
    for (_, a), (_, b) in zip(got, full, strict=True):
        assert torch.equal(a.s_img, b.s_img) and torch.equal(a.q_lbl, b.q_lbl)


def test_class_episodes_are_valid(shards: Path, tmp_path: Path):
    cfg = tiny_cfg(shards, tmp_path, "episodes.n_way=3", "episodes.k_shot=2", "episodes.n_query=1",
                   "episodes.min_pixels=1")
    pool = load_split(shards, "train", size=64)
    a = EpisodeSampler(pool, cfg.episodes, seed=1, rank=0)
    b = EpisodeSampler(pool, cfg.episodes, seed=1, rank=1)
    for step in range(20):
        ep = a.episode(step)
        again = EpisodeSampler(pool, cfg.episodes, seed=1, rank=0).episode(step)
        assert np.array_equal(ep.support, again.support) and np.array_equal(ep.ways, again.ways)
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert len(set(ep.ways.tolist())) == 3
        for i, c in enumerate(ep.ways):
            for idx in (*ep.support[i * 2:(i + 1) * 2], ep.query[i]):
                assert str(c) in pool.classes[idx]  # every chosen slice shows its way
    assert any(not np.array_equal(a.episode(s).support, b.episode(s).support) for s in range(5))

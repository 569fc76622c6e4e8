"""data.loader: stream: readers split ranks and workers disjointly, episodes are a function of (seed, rank,
step) and resume exactly from a checkpoint's few KB, memory is the buffer's and not the data's, and bad
input stops in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsct.config import load_config
from fsct.data.episodes import load_train_data
from fsct.data.pool import read_index
from fsct.data.shards import grow_splits
from fsct.data.stream import STATE, StreamData, split_readers
from fsct.errors import FsctError
from tests.conftest import REPO, fsct_env

TINY = ["data.image_size=32", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2",
        "train.save_every=0", "data.loader=stream"]
CPU = torch.device("cpu")


def stream_cfg(shards: Path, *extra: str):
    return load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", *TINY, *extra])


def train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fsct", "train", "--config", str(REPO / "configs" / "demo.yaml"),
            f"data.shards={shards}", f"train.output_dir={out}", *TINY, *extra]


def train(shards: Path, out: Path, *extra: str, resume: bool = False) -> dict | None:
    """rank0.json of the run (None when it stopped before the end)."""
    r = subprocess.run(train_cmd(shards, out, *extra) + (["--resume", "auto"] if resume else []),
                       capture_output=True, text=True, env=fsct_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    path = out / "rank0.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (3, 2)])
def test_readers_split_the_split_over_ranks_and_workers(stream_shards: Path, world: int, workers: int):
    info = read_index(stream_shards)["splits"]["train"]
    got = [(r, k) for rank in range(world)
           for r in split_readers(stream_shards, info, "train", rank, world, workers)
           for ks in r.keys.values() for k in ks]
    keys = [k for _, k in got]
    assert sorted(keys) == sorted(info["samples"]) and len(set(keys)) == len(keys)  # each slice once
    if len(info["shards"]) >= world * workers:  # enough tars: no tar is opened by two readers
        names = [n for rank in range(world) for r in split_readers(stream_shards, info, "train", rank, world, workers)
                 for n in r.names]
        assert len(set(names)) == len(names)


@pytest.mark.parametrize("extra", [
    ["episodes.mode=class", "data.buffer_slices=4", "data.slice_uses=1"],
    ["episodes.mix={slice: 0.5, superpixel: 0.3, class: 0.2}", "data.num_workers=2", "optim.grad_accum=2",
     "episodes.episodes_per_step=2", "data.buffer_slices=3"],  # slice_uses 4: the default
], ids=["class", "mix-2-workers"])
def test_stream_is_a_function_of_the_seed_and_resumes_exactly(stream_shards: Path, tmp_path: Path,
                                                             extra: list[str]):
    cfg = stream_cfg(stream_shards, "train.max_steps=9", *extra)
    micro = cfg.optim.grad_accum
    data = load_train_data(cfg, 0, 1)
    assert isinstance(data, StreamData)
    full, it = [], data.batches(cfg, 0, CPU)
    for i in range(9 * micro):
        full.append(next(it))
        if i + 1 == 4 * micro:  # a checkpoint after step 4
            data.save(tmp_path, 0)
    assert (tmp_path / STATE.format(rank=0)).stat().st_size < 4096
    again = list(load_train_data(cfg, 0, 1).batches(cfg, 0, CPU))
    resumed_data = load_train_data(cfg, 0, 1)
    resumed_data.restore(tmp_path, 0)
    resumed = list(resumed_data.batches(cfg, 4, CPU))
    assert len(resumed) == 5 * micro
    for run in (again, [*full[:4 * micro], *resumed]):
        for (ka, a), (kb, b) in zip(full, run, strict=True):
            assert ka == kb
            assert torch.equal(a.s_img, b.s_img) and torch.equal(a.q_lbl, b.q_lbl)
    other_rank = list(load_train_data(cfg, 1, 2).batches(cfg, 0, CPU))
    assert [k for k, _ in other_rank] != [k for k, _ in full]


def test_stream_bad_input_is_one_line(shards: Path, stream_shards: Path, tmp_path: Path):
    # superpixel episodes from tars without superpixels: the tar and the fix, raised from the reader
    cfg = stream_cfg(shards, "episodes.mode=superpixel", "train.max_steps=2")
    with pytest.raises(FsctError, match=r"unlabeled-00000\d\.tar: sample '\d+' has no sp\.png .*--superpixels") as e:
        next(load_train_data(cfg, 0, 1).batches(cfg, 0, CPU))
    assert "\n" not in str(e.value)
    with pytest.raises(FsctError, match="too few for 2 rank.* x 4 reader"):
        load_train_data(stream_cfg(stream_shards, "data.num_workers=4"), 1, 2)  # 2 slices, 4 readers
    bad = tmp_path / STATE.format(rank=0)
    bad.write_text("{not json")
    with pytest.raises(FsctError, match=f"{bad}: corrupt stream state"):
        load_train_data(stream_cfg(stream_shards), 0, 1).restore(tmp_path, 0)
    bad.write_text(json.dumps({"version": 1, "workers": 2, "micro_step": 4, "buffers": {"mask": {}}}))
    with pytest.raises(FsctError, match="resume with data.num_workers=2"):
        load_train_data(stream_cfg(stream_shards), 0, 1).restore(tmp_path, 0)
    with pytest.raises(FsctError, match="data.buffer_slices=1 must be >= 2"):
        stream_cfg(stream_shards, "data.buffer_slices=1")


@pytest.mark.slow
def test_stream_training_is_reproducible_and_resumes_exactly(stream_shards: Path, tmp_path: Path):
    steps = ["train.max_steps=4", "data.num_workers=1", "data.buffer_slices=4"]
    ref = train(stream_shards, tmp_path / "ref", *steps)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "PREEMPT").touch()  # what the SLURM script does: checkpoint after the first step and stop
    assert train(stream_shards, cut, *steps) is None
    assert (cut / "PREEMPTED").read_text().strip() == "1"
    assert (cut / "checkpoints" / "step_00000001" / STATE.format(rank=0)).is_file()
    resumed = train(stream_shards, cut, *steps, resume=True)
    for key in ("params", "state", "episodes_digest", "slices_reached"):
        assert resumed[key] == ref[key], key  # the same episodes, so the same weights


@pytest.mark.slow
def test_stream_memory_is_the_buffer_not_the_data(stream_shards: Path, tmp_path: Path):
    """20x the buffer streamed through at 32 px: every slice trained on, and peak RSS within a fixed 48 MB of a
    run over 6 slices, though the slices it decodes (512x512 image, mask, superpixels) add up to 252 MB. Then
    at 512 px, one step each on the same data: the memory loader holds the 240 MB of the pool, the stream
    its 16 slices."""
    big = tmp_path / "big"
    grow_splits(stream_shards, big, {"train": 320}, shard_size=20)
    slice_mode = ["episodes.mode=slice", "data.buffer_slices=16", "episodes.episodes_per_step=8",
                  "data.slice_uses=1"]  # each slice drawn by one step: 60 steps go through 320 slices
    small = train(stream_shards, tmp_path / "small", *slice_mode, "train.max_steps=4")
    run = train(big, tmp_path / "run", *slice_mode, "train.max_steps=60")
    assert run["slices_reached"] == len(run["pool_keys"]) == 320 and not run["unreached"]
    assert run["peak_rss_mb"] < small["peak_rss_mb"] + 48

    one_step = ["episodes.mode=slice", "data.buffer_slices=16", "data.image_size=512", "train.max_steps=1"]
    stream = train(big, tmp_path / "stream512", *one_step)
    memory = train(big, tmp_path / "memory512", *one_step, "data.loader=memory")
    pool_mb = 320 * 512 * 512 * 3 / 2**20  # image, mask and superpixels of every slice: 240 MB
    assert memory["peak_rss_mb"] - stream["peak_rss_mb"] > pool_mb / 2  # by hand: 166, 205, 235 MB

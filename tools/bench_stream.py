"""What the stream's data path costs, without a model (docs/SCALING.md):

- decode: ms per slice for one reader (tar read, checks, npy + PNG decode, resize to data.image_size);
- replay: seconds per micro-step of the stream from step 0 (draws and decodes, no batches built): what
  resuming by replaying the stream would cost per step already trained;
- restore: seconds to take back a checkpoint's buffer (its keys re-read from their tars) and draw the next
  batch: what resuming from the saved state costs, whatever the step; and the state file's size;
- index (`--index N`): index.json of an N-slice train split (the shards' own entries repeated): bytes on
  disk, and time and memory to parse it, which every rank pays once whatever its loader.

    python tools/bench_stream.py --shards DIR [--grow N] [--steps 200] [--index N] [key=value ...]

`--grow N` first grows the train split to N slices (fsct.data.shards.grow_splits) in a temp dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from fsct.config import load_config
from fsct.data.pool import read_index
from fsct.data.shards import grow_splits
from fsct.data.stream import STATE, StreamData, read_slices, used_slots

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--grow", type=int, default=0, help="grow the train split to this many slices first")
    p.add_argument("--steps", type=int, default=200, help="micro-steps streamed before the checkpoint")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "panet_5w5s.yaml")
    p.add_argument("--index", type=int, default=0, help="also time parsing an index.json of this many slices")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.index:
        index_cost(a.shards, a.index)
    with tempfile.TemporaryDirectory(prefix="fsct-stream-") as tmp:
        shards = a.shards
        if a.grow:
            shards = Path(tmp) / "grown"
            grow_splits(a.shards, shards, {"train": a.grow}, shard_size=256)
        cfg = load_config(a.config, [f"data.shards={shards}", "data.loader=stream", "data.cache_on_device=false",
                                     f"train.max_steps={a.steps + 10}", *a.overrides])
        cpu = torch.device("cpu")
        data = StreamData(cfg, 0, 1)
        spec = data.specs["mask"][0]
        slices = read_slices(spec, 0, 0)
        next(slices)
        t = time.perf_counter()
        n = sum(1 for _ in itertools.islice(slices, 256))
        decode_ms = 1000 * (time.perf_counter() - t) / n

        t = time.perf_counter()
        data.open(cfg, 0, cpu)
        for micro in range(a.steps):
            buf, episodes = data.draw_step(micro)
            buf.refill(used_slots(episodes))
        replay_s = (time.perf_counter() - t) / a.steps
        ckpt = Path(tmp) / "ckpt"
        ckpt.mkdir()
        data.save(ckpt, 0)
        taken = sum(b.feed.position for b in data.buffers.values())

        t = time.perf_counter()
        again = StreamData(cfg, 0, 1)
        again.restore(ckpt, 0)
        next(again.batches(cfg, a.steps // cfg.optim.grad_accum, cpu))
        restore_s = time.perf_counter() - t
        e = cfg.episodes
        print(f"{cfg.data.image_size} px, {e.n_way}-way {e.k_shot}-shot {e.n_query}-query {e.effective_mix}, "
              f"{e.episodes_per_step} episodes/step, buffer {cfg.data.buffer_slices}, slice_uses "
              f"{cfg.data.slice_uses}, {spec.n_slices} slices")
        print(f"decode: {decode_ms:.2f} ms per slice (one reader)")
        print(f"replay: {replay_s * 1000:.1f} ms per micro-step ({taken / a.steps:.1f} slices read per step); "
              f"10k steps: {replay_s * 1e4 / 60:.1f} min, 100k steps: {replay_s * 1e5 / 3600:.2f} h")
        print(f"restore: {restore_s:.2f} s at any step; state {(ckpt / STATE.format(rank=0)).stat().st_size} bytes")


def index_cost(shards: Path, n: int) -> None:
    info = read_index(shards)["splits"]["train"]
    base = list(info["samples"].values())
    per_tar = 256
    samples = {str(i): {"shard": f"train-{i // per_tar:06d}.tar", "classes": base[i % len(base)]["classes"]}
               for i in range(n)}
    classes: dict[str, list[list[str]]] = {}
    for k, v in samples.items():
        for c in v["classes"]:
            classes.setdefault(c, []).append([v["shard"], k])
    shards_ = [{"name": f"train-{i:06d}.tar", "n_samples": per_tar, "bytes": 0, "sha256": "0" * 64}
               for i in range(-(-n // per_tar))]
    text = json.dumps({"version": 1, "splits": {"train": {"n_samples": n, "shards": shards_, "samples": samples,
                                                          "classes": classes}}}, indent=1, sort_keys=True)
    del samples, classes
    tracemalloc.start()
    t = time.perf_counter()
    parsed = json.loads(text)
    seconds = time.perf_counter() - t
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"index of {n} slices: {len(text) / n:.0f} bytes per slice on disk, parsed in {seconds:.2f} s, "
          f"{held / n / 1024:.1f} KiB per slice held ({held / 2**20:.0f} MiB)")
    del parsed


if __name__ == "__main__":
    main()

"""The learned partition two ways on one model's maps: the CPU path (`predict.partition_ops=numpy`: scikit-image
basins and watershed, the greedy merge order in Python, one slice at a time) and the batched torch ops
(`partition_ops=torch`, fsct/partition_torch.py, what a GPU runs).

  python tools/compare_partition_ops.py --model RUN_OR_MODEL_DIR --data DIR [--device cuda] [--thresholds 0.2 0.25]
      [--shards SHARDS]        # a model with predict.support_vote > 0: its train split's slices vote

DIR holds X_test/images and Y_test.csv (labelled test slices). Prints, per threshold: how many slices get the
identical partition when both paths merge the same units (the CPU flood's), the official score of each
path end to end and the ARI between their partitions (1 where they agree); then ms per slice of each path
on --device (maps excluded, batches of --batch) and of the torch path's stages.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from threshold_sweep import test_slices  # noqa: E402

from fsct.bench import sync  # noqa: E402
from fsct.checkpoint import load_model  # noqa: E402
from fsct.metrics import official_score_slice  # noqa: E402
from fsct.partition import (  # noqa: E402
    Hierarchy,
    _work,
    basins,
    flood,
    flood_torch,
    hierarchy_partition,
    learned_partition,
    merge_sequence,
)
from fsct.partition_torch import basins_torch, partition_from_units  # noqa: E402
from fsct.predict import dense_maps  # noqa: E402
from fsct.vote import shard_voters, vote_on  # noqa: E402


def timed(fn, dev: torch.device) -> tuple[object, float]:
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shards", type=Path, help="the support shards (their train split votes; predict.support_vote)")
    p.add_argument("overrides", nargs="*", help="key=value over the model's config, e.g. predict.support_vote=0.25")
    p.add_argument("--thresholds", type=float, nargs="*", help="default: the model's saved threshold")
    p.add_argument("--batch", type=int, default=16, help="slices per batch in the timing")
    p.add_argument("--repeat", type=int, default=1, help="time the slices this many times over")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.set_grad_enabled(False)
    model, cfg = load_model(a.model, a.overrides)
    pc = cfg.predict
    images, truth = test_slices(a.data, 10_000)
    maps = [dense_maps(model, images[i:i + 8], pc.tta_flip, cfg.data.image_size) for i in range(0, len(images), 8)]
    prob, emb = (torch.cat(m) for m in zip(*maps, strict=True))
    w = pc.embedding_weight
    voters = None
    if vote_on(pc):
        if a.shards is None:
            p.error(f"the model sets predict.support_vote={pc.support_vote}: give --shards")
        voters = shard_voters(model, a.shards, cfg.data.train_split, pc, cfg.data.image_size)
    work_prob = _work(prob[:, None])[:, 0]
    work_emb = _work(emb) if w > 0 or voters is not None else None
    units = flood(basins(work_prob), work_prob).long()
    size = units.shape[-1]
    print(f"{len(images)} slices, embedding_weight {w}, support_vote {pc.support_vote if voters else 0}, "
          f"min_region {pc.min_region}, device {dev}")
    for t in a.thresholds or [pc.boundary_threshold]:
        ref = [hierarchy_partition(Hierarchy(u, merge_sequence(u, q, None if work_emb is None else work_emb[i].numpy(),
                                                               w, voters)), t, pc.min_region, size)
               for i, (u, q) in enumerate(zip(units.numpy(), work_prob.numpy(), strict=True))]
        got = partition_from_units(units, work_prob, t, pc.min_region, work_emb, w, voters).numpy()
        same = sum(np.array_equal(r, g) for r, g in zip(ref, got, strict=True))
        cfg_t = {ops: replace(pc, boundary_threshold=t, partition_ops=ops) for ops in ("numpy", "torch")}
        parts = {ops: learned_partition(prob, c, 512, emb, voters) for ops, c in cfg_t.items()}
        scores = {ops: np.mean([official_score_slice(tr, x) for tr, x in zip(truth, part, strict=True)])
                  for ops, part in parts.items()}
        between = [official_score_slice(x.astype(np.int64), y) for x, y in zip(parts["numpy"], parts["torch"],
                                                                                strict=True)]
        print(f"threshold {t}: same units -> identical partitions {same}/{len(ref)}; official score numpy "
              f"{scores['numpy']:.4f} torch {scores['torch']:.4f}; ARI between them mean {np.mean(between):.4f} "
              f"min {np.min(between):.4f}")
    pd, ed = prob.to(dev), emb.to(dev)
    vd = None if voters is None else voters.to(dev)
    for ops, c in cfg_t.items():
        learned_partition(pd[: a.batch], c, 512, ed[: a.batch], vd)  # warm-up
        total = 0.0
        for _ in range(a.repeat):
            for i in range(0, len(images), a.batch):
                _, s = timed(lambda i=i, c=c: learned_partition(pd[i:i + a.batch], c, 512, ed[i:i + a.batch], vd),
                             dev)
                total += s
        n = a.repeat * len(images)
        print(f"partition_ops={ops} on {dev}: {1e3 * total / n:.1f} ms per slice ({n / total:.1f} slices/s), "
              f"batches of {a.batch}")
    # the torch path's stages, one batch
    pb, eb = _work(pd[: a.batch, None])[:, 0], _work(ed[: a.batch]) if w > 0 or vd is not None else None
    seeds, t_basins = timed(lambda: basins_torch(pb), dev)
    units, t_flood = timed(lambda: flood_torch(seeds, pb).long(), dev)
    _, t_merge = timed(lambda: partition_from_units(units, pb, pc.boundary_threshold, pc.min_region, eb, w, vd),
                       dev)
    print(f"torch stages, ms per slice (batch of {len(pb)}): basins {1e3 * t_basins / len(pb):.1f}, "
          f"flood {1e3 * t_flood / len(pb):.1f}, merges and clean-up {1e3 * t_merge / len(pb):.1f}")


if __name__ == "__main__":
    main()

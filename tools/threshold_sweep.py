"""The official score of a dense model's partition at every boundary threshold of the grid (fsct.threshold),
on val slices of a shard set (what training chooses the threshold on) or on a labelled test set.

  python tools/threshold_sweep.py --model RUN_OR_MODEL_DIR --shards SHARDS [--slices 8]
  python tools/threshold_sweep.py --model RUN_OR_MODEL_DIR --data DIR        # DIR/X_test/images + Y_test.csv
  python tools/threshold_sweep.py --model M --shards SHARDS --data DIR       # val's choice, scored on test
  ... predict.partition_split=learned                                          # predict overrides
  ... predict.min_regions=N             # a region floor (fsct.partition.floored); it prints the shards' own
  ... --oracle                          # also the oracle merge of the learned units and of the superpixels
  ... predict.support_vote=0.25         # the shards' train slices vote on the merges (fsct/vote.py)

Shows how many val slices a stable choice needs and whether the choice on val carries to test; --per-slice
prints each slice's own best threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fsct.body_scale import unframed
from fsct.checkpoint import load_model
from fsct.data.challenge import list_images, read_image, read_labels
from fsct.data.episodes import PoolTensors
from fsct.data.pool import load_split, read_index
from fsct.metrics import official_score_slice
from fsct.predict import FramedMaps, framed_maps
from fsct.threshold import GRID, region_floor, threshold_scores
from fsct.vote import shard_voters, vote_on


def val_slices(shards: Path, split: str, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 images and label maps of the first n slices of a split, at their own size, as training scores
    val slices."""
    t = PoolTensors.from_pool(load_split(shards, split))
    return t.images[:n], t.masks[:n].numpy()


def test_slices(data: Path, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first n slices of DATA/X_test/images and their DATA/Y_test.csv label maps."""
    paths = list_images(data / "X_test" / "images")[:n]
    _, truth = read_labels(data / "Y_test.csv")
    return torch.from_numpy(np.stack([read_image(p) for p in paths])), truth[: len(paths)]


def maps(model: torch.nn.Module, cfg, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary probabilities and embeddings of the slices as predict computes them, for the experiments in
    docs/experiments, which score partitions in the slices' own frames."""
    m = framed_maps(model, images, cfg.predict, cfg.data.image_size, batch=8)
    if bool(m.frames.moved.any()):
        raise SystemExit("a slice's body is smaller than the model's body size: run with predict.body_size=0")
    return m.prob, m.emb


def _ratios(m: FramedMaps) -> str:
    r = m.frames.ratio[m.frames.moved]
    return f"{float(r.min()):.2f}-{float(r.max()):.2f}" if len(r) else "none"


def oracle_merge(units: np.ndarray, truth: np.ndarray) -> float:
    """The official score of `units` (an over-segmentation at the truth's size) with each unit labelled by the
    truth label most of its *foreground* pixels carry. Only foreground is scored, so a unit's background
    pixels must not outvote its foreground ones: labelled 0, they would join every other such unit."""
    votes = np.bincount(units.ravel() * 256 + truth.ravel(), minlength=(int(units.max()) + 1) * 256)
    votes = votes.reshape(-1, 256)
    votes[:, 0] = 0
    return official_score_slice(truth, votes.argmax(1)[units])


def oracles(cfg, images: torch.Tensor, truth: np.ndarray, m: FramedMaps) -> tuple[float, float]:
    """Mean oracle merge (`oracle_merge`) of the learned partition's units (the watershed basins before any
    merge) and of the body's intensity superpixels: the best any merge of either can do. A partition near
    its units' bound is limited by the units, one far below it by the merge and the threshold."""
    from fsct.partition import body_superpixels, learned_units

    learned, sp = [], []
    units, _ = learned_units(m.prob)  # the basins alone: the oracle needs no merge order
    for j, (u, im, t) in enumerate(zip(units, images.numpy(), truth, strict=True)):
        u = torch.nn.functional.interpolate(torch.from_numpy(u)[None, None].float(), size=t.shape,
                                            mode="nearest")[0, 0].long().numpy()
        learned.append(oracle_merge(unframed(u, m.frames.select(j)), t))
        sp.append(oracle_merge(body_superpixels(im, cfg.predict.sp_scale), t))
    return float(np.mean(learned)), float(np.mean(sp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--shards", type=Path, help="score the val split's slices")
    p.add_argument("--data", type=Path, help="score a labelled test set at 512 px")
    p.add_argument("--split", help="the shards' split to score (default: the model's data.val_split)")
    p.add_argument("--slices", type=int, default=1000, help="the first N slices")
    p.add_argument("--json", type=Path, help="write the curves here")
    p.add_argument("--per-slice", action="store_true", help="print each slice's best threshold too")
    p.add_argument("--oracle", action="store_true", help="print the oracle merges of the units and superpixels too")
    p.add_argument("overrides", nargs="*", help="key=value over the model's config, e.g. predict.min_region=16")
    a = p.parse_args()
    if not (a.shards or a.data):
        p.error("give --shards, --data or both")
    model, cfg = load_model(a.model, a.overrides)
    sets = {}
    if a.shards:
        sets["val"] = val_slices(a.shards, a.split or cfg.data.val_split, a.slices)
    if a.data:
        sets["test"] = test_slices(a.data, a.slices)
    voters = None
    if vote_on(cfg.predict):
        if not a.shards:
            p.error("predict.support_vote > 0: give --shards (its train split's slices vote)")
        voters = shard_voters(model, a.shards, cfg.data.train_split, cfg.predict, cfg.data.image_size)
        print(f"support vote {cfg.predict.support_vote}: {len(voters.protos)} slices of {a.shards}")
    print(f"partition_split={cfg.predict.partition_split}; saved threshold {cfg.predict.boundary_threshold}; "
          f"region floor (predict.min_regions) {cfg.predict.min_regions}")
    if a.shards:  # what training on these shards sets the floor to (models trained before it have 0)
        floor = region_floor(read_index(a.shards), cfg.data.train_split, cfg.predict.min_region)
        print(f"{a.shards}: region floor of its {cfg.data.train_split} split: {floor}")
    curves = {}
    for name, (images, truth) in sets.items():
        m = framed_maps(model, images, cfg.predict, cfg.data.image_size, batch=8)
        scores = threshold_scores(m.prob, m.seen.numpy(), truth, cfg.predict, GRID, m.emb, m.frames,
                                  voters)  # (T, slices)
        if cfg.predict.body_size > 0:
            print(f"{name}: {int(m.frames.moved.sum())} of {len(images)} slices seen through a body-scale window "
                  f"(predict.body_size {cfg.predict.body_size:.3f}, ratios {_ratios(m)})")
        curves[name] = scores.mean(1)
        if a.per_slice:
            print(f"{name} per slice, best threshold (score): " + " ".join(
                f"{GRID[int(i)]:.3f} ({v:.3f})" for i, v in zip(scores.argmax(0), scores.max(0), strict=True)))
        print(f"{name} ({len(images)} slices): " + " ".join(f"{t:.3f}:{v:.4f}" for t, v in zip(GRID, curves[name],
                                                                                              strict=True)))
        print(f"{name} best {GRID[int(curves[name].argmax())]:.3f}: {curves[name].max():.4f}")
        if a.oracle:
            units, sp = oracles(cfg, images, truth, m)
            print(f"{name} oracle merge of the learned units: {units:.4f}; of the superpixels: {sp:.4f}")
    if a.json:
        a.json.write_text(json.dumps({"grid": GRID, **{k: v.tolist() for k, v in curves.items()}}))
    if len(curves) == 2:
        chosen = int(curves["val"].argmax())
        print(f"val chooses {GRID[chosen]:.3f}: test {curves['test'][chosen]:.4f} (test's best "
              f"{curves['test'].max():.4f} at {GRID[int(curves['test'].argmax())]:.3f})")


if __name__ == "__main__":
    main()

"""The official score of a dense model's partition at every boundary threshold of the grid (fsct.threshold),
on val slices of a shard set (what training chooses the threshold on) or on a labelled test set.

  python tools/threshold_sweep.py --model RUN_OR_MODEL_DIR --shards SHARDS [--slices 8]
  python tools/threshold_sweep.py --model RUN_OR_MODEL_DIR --data DIR        # DIR/X_test/images + Y_test.csv
  ... predict.partition_split=learned                                          # predict overrides

Shows how many val slices a stable choice needs and whether the choice on val carries to test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fsct.checkpoint import load_model
from fsct.data.challenge import list_images, read_image, read_labels
from fsct.data.episodes import PoolTensors
from fsct.data.pool import load_split
from fsct.predict import boundary_batch
from fsct.threshold import GRID, threshold_scores


def slices(a: argparse.Namespace, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 images (N,S,S) and label maps (N,S,S) of the first --slices slices."""
    if a.data:
        paths = list_images(a.data / "X_test" / "images")[: a.slices]
        _, truth = read_labels(a.data / "Y_test.csv")
        return torch.from_numpy(np.stack([read_image(p) for p in paths])), truth[: len(paths)]
    t = PoolTensors.from_pool(load_split(a.shards, split))  # at their own size, as training scores them
    return t.images[: a.slices], t.masks[: a.slices].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", type=Path, help="score the val split's slices")
    src.add_argument("--data", type=Path, help="score a labelled test set at 512 px")
    p.add_argument("--slices", type=int, default=1000, help="the first N slices")
    p.add_argument("overrides", nargs="*", help="key=value over the model's config, e.g. predict.min_region=16")
    a = p.parse_args()
    model, cfg = load_model(a.model, a.overrides)
    images, truth = slices(a, cfg.data.val_split)
    with torch.no_grad():
        prob = torch.cat([boundary_batch(model, images[i:i + 8], False, cfg.data.image_size)
                          for i in range(0, len(images), 8)])
    scores = threshold_scores(prob, images.numpy(), truth, cfg.predict, GRID)
    print(f"{len(images)} slices, partition_split={cfg.predict.partition_split}; saved threshold "
          f"{cfg.predict.boundary_threshold}")
    for t, row in zip(GRID, scores, strict=True):
        print(f"threshold {t:.3f}: official {row.mean():.4f}")
    print(f"best {GRID[int(scores.mean(1).argmax())]:.3f}")


if __name__ == "__main__":
    main()

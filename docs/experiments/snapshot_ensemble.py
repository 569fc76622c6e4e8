"""Snapshot ensemble experiment (docs/RESULTS.md, "A per-slice stop", its last bullet): the learned
partition of several checkpoints of one run, their maps averaged, against each checkpoint alone.

  python docs/experiments/snapshot_ensemble.py --models STEP_DIR [STEP_DIR ...] --shards SHARDS --data DIR

Each STEP_DIR holds a checkpoint's model.safetensors with its run's config.yaml beside it; the last one's
predict settings (floor, merge cost) serve all. The ensemble's boundary map is the mean of the checkpoints'
maps, its embedding their concatenation (the cosine of concatenated region means weighs each checkpoint by
its embeddings' norm). The threshold is chosen on the val slices under the floor, as training chooses it,
and scored on DIR's test slices.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from threshold_sweep import maps, test_slices, val_slices  # noqa: E402

from fsct.checkpoint import load_model  # noqa: E402
from fsct.threshold import GRID, threshold_scores  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    a = p.parse_args()
    cfg = load_model(a.models[-1])[1]
    sets = {"val": val_slices(a.shards, cfg.data.val_split, 1000), "test": test_slices(a.data, 1000)}
    per_model = []
    for m in a.models:
        model, mcfg = load_model(m)
        per_model.append({k: maps(model, mcfg, images) for k, (images, _) in sets.items()})

    def report(name: str, chosen: list[dict]) -> None:
        curves = {}
        for k, (images, truth) in sets.items():
            prob = torch.stack([c[k][0] for c in chosen]).mean(0)
            emb = torch.cat([c[k][1] for c in chosen], 1)
            curves[k] = threshold_scores(prob, images.numpy(), truth, cfg.predict, GRID, emb).mean(1)
        i = int(curves["val"].argmax())
        print(f"{name}: val chooses {GRID[i]:.3f}: test {curves['test'][i]:.4f} "
              f"(test best {curves['test'].max():.4f} at {GRID[int(curves['test'].argmax())]:.3f})")

    for m, c in zip(a.models, per_model, strict=True):
        report(m.name, [c])
    report("ensemble of " + " ".join(m.name for m in a.models), per_model)


if __name__ == "__main__":
    main()

"""Time `fsct.submission.write_submission` against the organisers' `DataFrame.to_csv` on realistic masks.

    .venv/bin/python tools/bench_submission.py [--slices 500] [--work DIR]

Prints one JSON object: both times, their ratio, and whether the two files are byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 512


def blob_masks(n: int, rng: np.random.Generator, structures: float = 18.0, spread: float = 7.0,
               foreground: float = 0.19) -> np.ndarray:
    """(n, 512, 512) uint8 label maps shaped like the challenge's: about `structures` wobbly blobs per
    slice, around the centre, with sparse ids (1..117), covering about `foreground` of the pixels."""
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for m in masks:
        k = int(np.clip(rng.normal(1.1 * structures, spread), 3, 60))  # some get covered up
        ids = rng.choice(np.arange(1, 118), size=k, replace=False)
        # area per blob so that k blobs cover the target fraction (a little more: they overlap)
        mean_r = np.sqrt(foreground * 1.45 * SIZE * SIZE / (k * np.pi))
        for label in ids:
            r = mean_r * rng.uniform(0.4, 1.6)
            cy, cx = rng.uniform(0.2, 0.8, 2) * SIZE
            y0, y1 = int(max(cy - 1.5 * r, 0)), int(min(cy + 1.5 * r + 1, SIZE))
            x0, x1 = int(max(cx - 1.5 * r, 0)), int(min(cx + 1.5 * r + 1, SIZE))
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            theta = np.arctan2(dy, dx)
            aspect = rng.uniform(0.6, 1.0)
            wobble = 1 + 0.15 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * theta)
            inside = (dx / r) ** 2 + (dy / (r * aspect)) ** 2 <= wobble ** 2
            m[y0:y1, x0:x1][inside] = label
    return masks


def bench(slices: int, work: Path, seed: int = 0) -> dict:
    import pandas as pd

    from fsct.submission import write_submission

    masks = blob_masks(slices, np.random.default_rng(seed))
    ours, theirs = work / "fsct.csv", work / "pandas.csv"
    t0 = time.perf_counter()
    write_submission(ours, masks)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    pd.DataFrame(masks.reshape(slices, -1)).T.to_csv(theirs)
    t_pandas = time.perf_counter() - t0
    return {
        "slices": slices,
        "foreground": round(float((masks > 0).mean()), 4),
        "labels_per_slice": round(float(np.mean([len(np.unique(m)) - 1 for m in masks])), 1),
        "file_mb": round(ours.stat().st_size / 1e6, 1),
        "write_submission_s": round(t_ours, 3),
        "pandas_to_csv_s": round(t_pandas, 3),
        "speedup": round(t_pandas / t_ours, 2),
        "identical": filecmp.cmp(ours, theirs, shallow=False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the two files (default: a temporary folder)")
    args = p.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(bench(args.slices, args.work, args.seed)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_submission-") as tmp:
        print(json.dumps(bench(args.slices, Path(tmp), args.seed)))


if __name__ == "__main__":
    main()

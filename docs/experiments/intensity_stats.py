"""How large are a challenge folder's intensity differences and noise, in grey levels, next to the training's
intensity augmentation (docs/RESULTS.md, "Intensity augmentation at the size of CT's own variation")?

  python docs/experiments/intensity_stats.py --data DIR [--slices 8]

For each labelled structure of the first N labelled train slices, inside the structure (eroded by 3 pixels,
so that borders do not count; >= 300 pixels): its mean grey level, its spread (std) and its pixel noise (std of
the pixel minus the 5x5 median around it). Prints the median spread and noise over all of them and the mean
grey levels of the structures whose mean lies in the soft-tissue range (100-160: organs, muscle, vessels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from fsct.data.challenge import list_images, read_image, read_labels


def structure_stats(img: np.ndarray, lbl: np.ndarray) -> list[tuple[int, float, float, float]]:
    """(id, mean, std, pixel noise) of each structure's inside."""
    grey = img.astype(np.float64)
    local = grey - ndi.median_filter(grey, 5)
    out = []
    for k in np.unique(lbl[lbl > 0]):
        inside = ndi.binary_erosion(lbl == k, iterations=3)
        if inside.sum() >= 300:
            out.append((int(k), grey[inside].mean(), grey[inside].std(), local[inside].std()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="challenge-format folder (X_train/, Y_train.csv)")
    ap.add_argument("--slices", type=int, default=8, help="labelled train slices to read")
    args = ap.parse_args()
    images = list_images(args.data / "X_train")
    columns, masks = read_labels(args.data / "Y_train.csv", [p.name for p in images])
    by_name = {p.name: p for p in images}
    rows = []
    labelled = [(name, lbl) for name, lbl in zip(columns, masks, strict=True) if lbl.any()]
    for name, lbl in labelled[: args.slices]:
        rows += structure_stats(read_image(by_name[name]), lbl)
    stats = np.array([r[1:] for r in rows])
    soft = stats[(stats[:, 0] >= 100) & (stats[:, 0] <= 160), 0]
    print(f"{len(rows)} structures: median spread {np.median(stats[:, 1]):.2f} grey levels, median pixel noise "
          f"{np.median(stats[:, 2]):.2f}")
    print(f"soft-tissue means ({len(soft)}): {np.percentile(soft, 10):.1f} .. {np.percentile(soft, 90):.1f} "
          f"(10th-90th percentile), median {np.median(soft):.1f}")


if __name__ == "__main__":
    main()

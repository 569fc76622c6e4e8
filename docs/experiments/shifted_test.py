"""Shifted test sets (docs/RESULTS.md, "Another patient, simulated"): the test slices of a challenge-format
folder as another patient or scanner might show them, so the learned partition's robustness can be set
beside superpixels' without other patients' data.

  python docs/experiments/shifted_test.py --data DIR --out OUT zoom=0.8 zoom=1.25 shift=0.1 noise=6 gamma=0.8

writes OUT/<name>/X_test/images and OUT/<name>/Y_test.csv per shift (the folders `tools/threshold_sweep.py
--data` and `fsct shard --split test` read):
  zoom=Z   the body Z times as wide (about the image's centre; < 1 a smaller patient, > 1 a larger one)
  shift=F  the body moved right and down by F of the image's width (another position on the table)
  noise=S  Gaussian noise of S grey levels (a noisier scanner or thinner slices; seeded)
  gamma=G  intensity x -> 255 (x / 255)^G (another window)
  organs=S each labelled structure's pixels shifted by its own offset, uniform in [-S, S] grey levels
           (another contrast phase or scanner: enhancement differs per organ; seeded)
Label maps move with their images (nearest neighbour); pixels moved in from outside are air (0).

  python docs/experiments/shifted_test.py --data DIR --sizes

prints the body sizes (fsct.body_scale) of DIR's test slices against the median of its labelled train slices:
which of them a model trained on DIR would see through a body-scale window (those smaller by more than
predict.body_tolerance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fsct.atomic import atomic_dir
from fsct.body_scale import body_size, median_body_size
from fsct.config import PredictConfig
from fsct.data.challenge import list_images, read_image, read_labels, write_labels


def _affine(a: np.ndarray, zoom: float, shift: float, resample: Image.Resampling) -> np.ndarray:
    # PIL's affine maps each output pixel to an input one: in = (out - c - s) / zoom + c
    n = a.shape[-1]
    c, s = (n - 1) / 2, shift * n
    inv = 1 / zoom
    coeffs = (inv, 0, c - (c + s) * inv, 0, inv, c - (c + s) * inv)
    return np.asarray(Image.fromarray(a).transform((n, n), Image.Transform.AFFINE, coeffs, resample, fillcolor=0))


def shifted(image: np.ndarray, mask: np.ndarray, kind: str, value: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 slice and its label map (uint8/uint16) as the shift `kind` (zoom/shift/noise/gamma/organs) shows
    them."""
    if kind in ("zoom", "shift"):
        zoom, move = (value, 0.0) if kind == "zoom" else (1.0, value)
        m = mask.astype(np.int32)
        return (_affine(image, zoom, move, Image.Resampling.BILINEAR),
                _affine(m, zoom, move, Image.Resampling.NEAREST).astype(mask.dtype))
    x = image.astype(np.float64)
    if kind == "noise":
        x = x + rng.normal(0, value, x.shape)
    elif kind == "gamma":
        x = 255 * (x / 255) ** value
    elif kind == "organs":
        offsets = rng.uniform(-value, value, int(mask.max()) + 1)
        offsets[0] = 0
        x = x + offsets[mask]
    else:
        raise ValueError(f"unknown shift {kind!r} (zoom, shift, noise, gamma, organs)")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), mask


def print_sizes(data: Path, tolerance: float = PredictConfig().body_tolerance) -> None:
    train = list_images(data / "X_train" / "images")
    _, masks = read_labels(data / "Y_train.csv", [q.name for q in train])
    ref = median_body_size(np.stack([read_image(q) for q, m in zip(train, masks, strict=True)
                                     if m is not None and m.any()]))
    ratios = np.array([body_size(read_image(q)) / ref for q in list_images(data / "X_test" / "images")])
    print(f"{data}: train median body size {ref:.4f}; test slices {ratios.min():.3f}-{ratios.max():.3f} of it, "
          f"{int((ratios < 1 - tolerance).sum())} of {len(ratios)} smaller by more than {tolerance}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder with X_test/images and Y_test.csv")
    p.add_argument("--out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", action="store_true", help="print the test slices' body sizes and stop")
    p.add_argument("shifts", nargs="*", help="kind=value, e.g. zoom=0.8")
    a = p.parse_args()
    if a.sizes:
        print_sizes(a.data)
        return
    if not a.out or not a.shifts:
        p.error("give --out and at least one shift")
    paths = list_images(a.data / "X_test" / "images")
    cols, masks = read_labels(a.data / "Y_test.csv", [q.name for q in paths])
    images = [read_image(q) for q in paths]
    for spec in a.shifts:
        kind, _, value = spec.partition("=")
        rng = np.random.default_rng(a.seed)
        pairs = [shifted(im, m, kind, float(value), rng) for im, m in zip(images, masks, strict=True)]
        with atomic_dir(a.out / f"{kind}{value}") as d:
            (d / "X_test" / "images").mkdir(parents=True)
            for q, (im, _) in zip(paths, pairs, strict=True):
                Image.fromarray(im).save(d / "X_test" / "images" / q.name)
            write_labels(d / "Y_test.csv", np.stack([m for _, m in pairs]), cols)
        print(f"{a.out / f'{kind}{value}'}: {len(pairs)} slices, {spec}")


if __name__ == "__main__":
    main()

"""In-repo Felzenszwalb (fsct.data.superpixels) vs scikit-image's, with the same body mask and settings:
seconds per slice and how well the segments follow the true structures (ARI over labelled foreground).

  python tools/compare_felzenszwalb.py --src tests/data/realct
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from fsct.data import superpixels as sp
from fsct.data.challenge import list_images, read_image, read_labels


def skimage_superpixels(image: np.ndarray, scale: float = 30.0, sigma: float = 0.5, min_size: int = 20) -> np.ndarray:
    """sp.superpixels with scikit-image's felzenszwalb on the same block-mean image; outside the body is
    one constant value, so segments stop at the body edge and the mask is applied after."""
    from skimage.segmentation import felzenszwalb

    body = sp.body_mask(image)
    f = image.shape[0] // sp.WORK_SIZE
    small = image.reshape(sp.WORK_SIZE, f, sp.WORK_SIZE, f).astype(np.float32).mean((1, 3))
    small_body = body.reshape(sp.WORK_SIZE, f, sp.WORK_SIZE, f).mean((1, 3)) >= 0.5
    # skimage divides `scale` by 255 (it expects images in [0, 1]): scale the image the same way
    labels = felzenszwalb(np.where(small_body, small, 0) / 255, scale=scale, sigma=sigma, min_size=min_size) + 1
    labels = np.where(small_body, labels, 0)
    full = np.repeat(np.repeat(labels, f, 0), f, 1)
    return np.where(body, full, 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--src", type=Path, default=Path("tests/data/realct"))
    args = p.parse_args()
    names = [q.name for q in list_images(args.src / "X_train")]
    labels_file = next(args.src.glob("Y_train.csv*"))
    cols, masks = read_labels(labels_file, names)
    for name, fn in (("fsct", sp.superpixels), ("skimage", skimage_superpixels)):
        secs, aris, segs = [], [], []
        for j, c in enumerate(cols):
            if not masks[j].any():
                continue
            img = read_image(args.src / "X_train" / "images" / c)
            t0 = time.perf_counter()
            seg = fn(img)
            secs.append(time.perf_counter() - t0)
            fg = masks[j] > 0
            aris.append(adjusted_rand_score(masks[j][fg], seg[fg]))
            segs.append(len(np.unique(seg[seg > 0])))
        print(f"{name:8s} slices {len(secs)}  s/slice {np.mean(secs):.3f}  segments {np.mean(segs):.0f}  "
              f"fg ARI vs truth {np.mean(aris):.3f}")


if __name__ == "__main__":
    main()

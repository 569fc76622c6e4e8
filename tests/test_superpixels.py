"""Superpixels: Felzenszwalb segments inside the body, at most 255, stored in shards and read back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fsct.data.challenge import read_image, read_labels, write_labels
from fsct.data.pool import load_split
from fsct.data.shards import shard_dataset
from fsct.data.superpixels import body_mask, felzenszwalb, superpixels

os.environ.setdefault("OMP_NUM_THREADS", "1")

SLICES = [3, 5, 7]  # labelled fixture slices: upper, middle, lower
UNLABELLED = [8, 9]


@pytest.fixture(scope="module")
def real(realct_dir: Path) -> dict:
    cols, masks = read_labels(realct_dir / "Y_train.csv.gz")
    images = {i: read_image(realct_dir / "X_train" / "images" / f"{i}.png") for i in SLICES + UNLABELLED}
    return {"images": images, "masks": {i: masks[cols.index(f"{i}.png")] for i in SLICES + UNLABELLED}}


def test_superpixels_cover_the_body_and_nothing_else(real):
    for i in SLICES:
        img = real["images"][i]
        sp = superpixels(img)
        assert sp.shape == (512, 512) and sp.dtype == np.uint8
        body = body_mask(img)
        assert 0.3 < body.mean() < 0.8  # an abdomen, not the whole frame nor a speck
        assert not sp[~body].any()  # nothing outside the body
        assert (sp[body] > 0).mean() > 0.99  # (almost) every body pixel has a segment
        n = len(np.unique(sp[sp > 0]))
        assert 10 <= n <= 255
        # The truth's structures lie inside the body: the segments cover them.
        truth_fg = real["masks"][i] > 0
        assert (sp[truth_fg] > 0).mean() > 0.97


def test_air_outside_the_patient_is_not_body():
    img = np.zeros((512, 512), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    img[(yy - 256) ** 2 + (xx - 256) ** 2 < 150 ** 2] = 120
    img[(yy - 256) ** 2 + (xx - 256) ** 2 < 40 ** 2] = 10  # lung-like air inside: a hole, filled
    img[480:484, 50:460] = 200  # a thin table under the patient: opened away
    body = body_mask(img)
    assert body[256, 256] and body[256, 150]
    assert not body[482, 256] and not body[10, 10]
    assert not superpixels(img)[482, 256]


def test_felzenszwalb_separates_flat_regions_and_caps_the_count():
    img = np.full((64, 64), 50.0)
    img[:, 32:] = 150.0
    mask = np.ones_like(img, bool)
    lab = felzenszwalb(img, mask, scale=10, sigma=0, min_size=5)
    assert len(np.unique(lab[:, :30])) == 1 and len(np.unique(lab[:, 34:])) == 1
    assert lab[0, 0] != lab[0, 63]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(float)
    many = felzenszwalb(noise, mask, scale=1, sigma=0, min_size=1, max_segments=12)
    assert 1 <= many.max() <= 12 and many.min() >= 1  # every masked pixel labelled, at most 12 ids


def test_superpixels_stored_in_shards_and_read_back(real, realct_dir: Path, tmp_path: Path):
    src = tmp_path / "X_train" / "images"
    src.mkdir(parents=True)
    keys = SLICES + UNLABELLED
    for i in keys:
        shutil.copyfile(realct_dir / "X_train" / "images" / f"{i}.png", src / f"{i}.png")
    write_labels(tmp_path / "Y_train.csv", np.stack([real["masks"][i] for i in keys]), [f"{i}.png" for i in keys])
    out = tmp_path / "shards"
    shard_dataset(src, tmp_path / "Y_train.csv", out, val_fraction=0, superpixels=True, workers=1, progress=False)
    for split, ids in (("train", SLICES), ("unlabeled", UNLABELLED)):
        pool = load_split(out, split)
        assert sorted(pool.keys, key=int) == [str(i) for i in ids]
        assert pool.superpixels is not None
        for k, sp in zip(pool.keys, pool.superpixels, strict=True):
            np.testing.assert_array_equal(sp, superpixels(real["images"][int(k)]))
    small = load_split(out, "unlabeled", size=128)
    assert small.superpixels.shape == (2, 128, 128)
    assert set(np.unique(small.superpixels[0])) <= set(np.unique(load_split(out, "unlabeled").superpixels[0]))

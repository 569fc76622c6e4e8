"""`fsct shard`: round trips through real tar files, the index against the CSV, bad input, --verify."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsct.data.pool import load_split
from fsct.data.shards import shard_dataset, verify
from fsct.errors import FsctError
from tests.conftest import fsct


def csv_masks(path: Path) -> dict[str, np.ndarray]:
    df = pd.read_csv(path, index_col=0)
    return {c: df[c].to_numpy().reshape(512, 512) for c in df.columns}


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Independent reader: plain tarfile, grouping members by key as webdataset does."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, field = m.name.split(".", 1)
            out.setdefault(key, {})[field] = tf.extractfile(m).read()
    return out


def test_round_trip_tarfile_matches_csv_and_pngs(synth: Path, shards: Path):
    index = json.loads((shards / "index.json").read_text())
    truth = csv_masks(synth / "Y_train.csv")
    seen = {}
    for split in ("train", "val", "unlabeled"):
        for shard in index["splits"][split]["shards"]:
            samples = tar_samples(shards / shard["name"])
            assert len(samples) == shard["n_samples"] <= 3
            for key, fields in samples.items():
                img = np.load(io.BytesIO(fields["img.npy"]))
                png = np.asarray(Image.open(synth / "X_train" / "images" / f"{key}.png"))
                np.testing.assert_array_equal(img, png)
                meta = json.loads(fields["meta.json"])
                assert meta["source"] == f"{key}.png"
                mask = truth[f"{key}.png"]
                if split == "unlabeled":
                    assert not mask.any() and "mask.png" not in fields
                else:
                    stored = np.asarray(Image.open(io.BytesIO(fields["mask.png"])))
                    np.testing.assert_array_equal(stored, mask)
                seen[key] = split
    assert sorted(seen, key=int) == [str(i) for i in range(14)]  # every slice exactly once


def test_round_trip_webdataset(shards: Path, synth: Path):
    import webdataset as wds

    index = json.loads((shards / "index.json").read_text())
    urls = [str(shards / s["name"]) for s in index["splits"]["test"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    keys = []
    for s in ds:
        png = np.asarray(Image.open(synth / "X_test" / "images" / f"{s['__key__']}.png"))
        np.testing.assert_array_equal(s["img.npy"], png)
        assert "mask.png" not in s
        keys.append(s["__key__"])
    assert sorted(keys, key=int) == ["0", "1", "2", "3"]


def test_index_counts_recomputed_from_csv(synth: Path, shards: Path):
    index = json.loads((shards / "index.json").read_text())
    truth = csv_masks(synth / "Y_train.csv")
    expected: dict[str, set[str]] = {}
    for name, mask in truth.items():
        for c in np.unique(mask):
            if c:
                expected.setdefault(str(c), set()).add(name.removesuffix(".png"))
    got: dict[str, set[str]] = {}
    for split in ("train", "val"):
        for c, entries in index["splits"][split]["classes"].items():
            got.setdefault(c, set()).update(k for _, k in entries)
        for key, info in index["splits"][split]["samples"].items():
            counts = np.bincount(truth[f"{key}.png"].ravel(), minlength=256)
            assert info["classes"] == {str(c): int(counts[c]) for c in np.flatnonzero(counts) if c}
    assert got == expected
    labelled = sum(1 for m in truth.values() if m.any())
    assert index["splits"]["train"]["n_samples"] + index["splits"]["val"]["n_samples"] == labelled
    assert index["splits"]["unlabeled"]["n_samples"] == 14 - labelled
    assert index["splits"]["test"]["n_samples"] == 4


def test_same_seed_same_index(synth: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        shard_dataset(synth / "X_train" / "images", synth / "Y_train.csv", out, seed=7, max_count=4,
                      workers=1, progress=False)
    assert (a / "index.json").read_bytes() == (b / "index.json").read_bytes()
    for t in sorted(a.glob("*.tar")):
        assert t.read_bytes() == (b / t.name).read_bytes()
    shard_dataset(synth / "X_train" / "images", synth / "Y_train.csv", b, seed=8, max_count=4, workers=1,
                  progress=False, overwrite=True)
    assert (a / "index.json").read_bytes() != (b / "index.json").read_bytes()


def test_val_classes_are_held_out_of_train(synth: Path, tmp_path: Path):
    truth = csv_masks(synth / "Y_train.csv")
    common = np.bincount(np.concatenate([np.unique(m) for m in truth.values()]))
    held = [int(c) for c in np.argsort(common)[::-1] if c][:2]
    index = shard_dataset(synth / "X_train" / "images", synth / "Y_train.csv", tmp_path / "s",
                          val_classes=held, workers=1, progress=False)
    assert index["val_classes"] == sorted(held)
    assert not set(map(str, held)) & set(index["splits"]["train"]["classes"])
    pool = load_split(tmp_path / "s", "train")
    assert not np.isin(pool.masks, held).any()


def test_load_split_resizes(shards: Path):
    pool = load_split(shards, "train", size=64)
    assert pool.images.shape[1:] == (64, 64) and pool.masks.shape == pool.images.shape
    assert len(pool) == json.loads((shards / "index.json").read_text())["splits"]["train"]["n_samples"]


def test_realct_fixture(realct_dir: Path, tmp_path: Path):
    out = tmp_path / "rc"
    r = fsct("shard", "--images", str(realct_dir / "X_train" / "images"), "--labels",
             str(realct_dir / "Y_train.csv.gz"), "--out", str(out), "--shard-size", "10")
    assert r.returncode == 0, r.stderr
    counts = verify(out)
    assert counts["unlabeled"] == 2 and counts["train"] + counts["val"] == 8
    index = json.loads((out / "index.json").read_text())
    assert index["stats"]["n_classes"] == 41
    truth = csv_masks(realct_dir / "Y_train.csv.gz")
    pool = load_split(out, "val")
    for key, mask in zip(pool.keys, pool.masks, strict=True):
        np.testing.assert_array_equal(mask, truth[f"{key}.png"])


def test_verify_detects_damage(shards: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    r = fsct("shard", "--verify", str(copy))
    assert r.returncode == 0 and "ok" in r.stdout
    victim = sorted(copy.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-3000])
    r = fsct("shard", "--verify", str(copy))
    assert r.returncode != 0 and victim.name in r.stderr


def test_existing_split_needs_overwrite(synth: Path, shards: Path):
    before = (shards / "index.json").read_bytes()
    r = fsct("shard", "--images", str(synth / "X_test" / "images"), "--out", str(shards), "--split", "test")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert (shards / "index.json").read_bytes() == before


def _write_csv(path: Path, masks: np.ndarray, names: list[str], rows: int | None = None) -> None:
    df = pd.DataFrame(masks.reshape(len(names), -1).T, columns=names)
    df.index = [f"Pixel {i}" for i in range(df.shape[0])]
    (df.iloc[:rows] if rows else df).to_csv(path)


BAD_CASES = ["truncated-csv", "non-integer", "label-over-255", "column-without-image", "corrupt-png",
             "wrong-size", "empty-folder"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(case: str, tmp_path: Path):
    images = tmp_path / "X_train" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["0.png", "1.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(images / n)
    masks = np.zeros((2, 512, 512), np.int64)
    masks[:, 100:200, 100:200] = 3
    labels = tmp_path / "Y_train.csv"
    culprit = labels
    if case == "truncated-csv":
        _write_csv(labels, masks, names, rows=1000)
    elif case == "non-integer":
        _write_csv(labels, masks.astype(float) + 0.5, names)
    elif case == "label-over-255":
        masks[0, 0, 0] = 300
        _write_csv(labels, masks, names)
    elif case == "column-without-image":
        _write_csv(labels, np.concatenate([masks, masks[:1]]), [*names, "7.png"])
    elif case == "corrupt-png":
        _write_csv(labels, masks, names)
        culprit = images / "1.png"
        culprit.write_bytes(culprit.read_bytes()[:500])
    elif case == "wrong-size":
        _write_csv(labels, masks, names)
        culprit = images / "1.png"
        Image.fromarray(np.zeros((256, 256), np.uint8)).save(culprit)
    elif case == "empty-folder":
        _write_csv(labels, masks, names)
        for f in images.iterdir():
            f.unlink()
        culprit = images
    out = tmp_path / "shards" / "out"
    r = fsct("shard", "--images", str(images), "--labels", str(labels), "--out", str(out), "--workers", "1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert culprit.name in lines[0]
    assert not out.exists()
    assert not list((tmp_path / "shards").glob(".*")) if (tmp_path / "shards").exists() else True


def test_missing_index_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FsctError, match="index.json"):
        verify(tmp_path)

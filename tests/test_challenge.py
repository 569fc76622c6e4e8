"""The challenge's files: slice PNGs and the label CSV, read right and refused clearly when malformed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsct.data import challenge
from fsct.data.challenge import N_PIXELS, column_to_image, list_images, read_image, read_labels, write_labels
from fsct.errors import FsctError


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _labels(tmp_path: Path, name: str = "Y.csv", columns: tuple[str, ...] = ("0.png", "1.png"),
            seed: int = 0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(columns), 512, 512), np.uint8)
    masks[:, 100:300, 150:350] = rng.integers(0, 256, (len(columns), 200, 200))
    path = tmp_path / name
    write_labels(path, masks, list(columns))
    return path, masks


def _edit(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


# --- images ---------------------------------------------------------------------------------------------

def test_list_images_orders_numerically(tmp_path):
    for i in (10, 2, 1, 100, 0):
        _png(tmp_path / "X" / f"{i}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "X" / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(tmp_path / "X")] == ["0.png", "1.png", "2.png", "10.png", "100.png"]


def test_list_images_accepts_images_subfolder(realct_dir):
    direct = list_images(realct_dir / "X_train")
    assert direct == list_images(realct_dir / "X_train" / "images")
    assert [int(p.stem) for p in direct] == list(range(10))


@pytest.mark.parametrize("case", ["missing", "empty", "non_integer", "same_number"])
def test_list_images_rejects(tmp_path, case):
    folder = tmp_path / "X"
    if case != "missing":
        folder.mkdir()
    if case == "non_integer":
        _png(folder / "1.png", np.zeros((4, 4), np.uint8))
        _png(folder / "slice_2.png", np.zeros((4, 4), np.uint8))
    if case == "same_number":
        _png(folder / "1.png", np.zeros((4, 4), np.uint8))
        _png(folder / "01.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FsctError, match=str(folder)):
        list_images(folder)


def test_read_image_real_slice(realct_dir):
    path = realct_dir / "X_train" / "images" / "7.png"
    img = read_image(path)
    assert img.shape == (512, 512) and img.dtype == np.uint8
    assert np.array_equal(img, np.asarray(Image.open(path).convert("L")))
    assert img.std() > 10  # a CT slice, not a blank


def test_read_image_converts_rgb_and_16bit(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    got = read_image(_png(tmp_path / "rgb.png", rgb))
    assert np.array_equal(got, np.asarray(Image.fromarray(rgb).convert("L")))
    wide = np.full((512, 512), 65535, np.uint16)
    wide[:, :256] = 257 * 100
    got = read_image(_png(tmp_path / "wide.png", wide))
    assert got.dtype == np.uint8 and set(np.unique(got)) == {100, 255}


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "small"])
def test_read_image_rejects(tmp_path, case):
    path = tmp_path / "5.png"
    if case == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    if case == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)
        data = _png(tmp_path / "full.png", noise).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    if case == "small":
        _png(path, np.zeros((256, 256), np.uint8))
    with pytest.raises(FsctError, match=str(path)) as err:
        read_image(path)
    assert "\n" not in str(err.value)
    if case == "small":
        assert "256x256" in str(err.value)


# --- labels ---------------------------------------------------------------------------------------------

def test_read_labels_matches_pandas_on_real_ct(realct_dir):
    names = [p.name for p in list_images(realct_dir / "X_train")]
    columns, masks = read_labels(realct_dir / "Y_train.csv.gz", names)
    frame = pd.read_csv(realct_dir / "Y_train.csv.gz", index_col=0)
    assert columns == list(frame.columns) == names
    assert masks.shape == (10, 512, 512) and masks.dtype == np.uint8
    for j, c in enumerate(columns):
        assert np.array_equal(masks[j], frame[c].to_numpy().reshape(512, 512)), c
    assert masks[:8].reshape(8, -1).any(axis=1).all() and not masks[8:].any()


def test_read_labels_round_trip_and_gzip(tmp_path):
    path, masks = _labels(tmp_path)
    assert path.read_bytes().startswith(b",0.png,1.png\nPixel 0,0,0\nPixel 1,0,0\n")
    columns, got = read_labels(path, ["0.png", "1.png"])
    assert columns == ["0.png", "1.png"] and np.array_equal(got, masks)
    gz = tmp_path / "Y.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    columns, got = read_labels(gz)
    assert columns == ["0.png", "1.png"] and np.array_equal(got, masks)


def test_read_labels_accepts_plain_integer_index(tmp_path):
    path, masks = _labels(tmp_path)
    frame = pd.DataFrame(masks.reshape(2, -1)).T
    frame.columns = ["0.png", "1.png"]
    frame.to_csv(tmp_path / "plain.csv")
    columns, got = read_labels(tmp_path / "plain.csv")
    assert columns == ["0.png", "1.png"] and np.array_equal(got, masks)


def _cut(path: Path, at: bytes, extra: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: data.index(at) + extra])


def _bad_value(path: Path, value: bytes) -> Path:
    return _edit(path, b"\nPixel 70000,0,0\n", b"\nPixel 70000,0," + value + b"\n")


BAD_LABELS = {
    "truncated_rows": (lambda p: _cut(p, b"Pixel 262000,", 0), "262000 rows, expected 262144"),
    "truncated_mid_row": (lambda p: _cut(p, b"Pixel 262000,", 14), "fields, expected 3"),
    "float": (lambda p: _bad_value(p, b"1.5"), "line 70002, column '1.png': label '1.5' is not an integer"),
    "float_late": (lambda p: _edit(p, b"\nPixel 200000,0,0\n", b"\nPixel 200000,0,2.5\n"),
                   "line 200002, column '1.png': label '2.5' is not an integer"),
    "text": (lambda p: _bad_value(p, b"abc"), "label 'abc' is not an integer"),
    "too_big": (lambda p: _bad_value(p, b"300"), "label 300 is outside 0..255"),
    "negative": (lambda p: _bad_value(p, b"-1"), "label -1 is outside 0..255"),
    "empty_cell": (lambda p: _bad_value(p, b""), "empty label"),
    "extra_rows": (lambda p: p.write_bytes(p.read_bytes() + b"Pixel 262144,0,0\n"), "more than 262144 rows"),
    "duplicate_column": (lambda p: _edit(p, b",0.png,1.png\n", b",0.png,0.png\n"),
                         "duplicate column name '0.png'"),
    "no_index": (lambda p: _edit(p, b"\nPixel 5,0,0\n", b"\n5,0,0\n") and
                 _edit(p, b"\nPixel 6,0,0\n", b"\nx,0,0\n"), "first column is 'x'"),
    "empty_file": (lambda p: p.write_bytes(b""), "empty file"),
}


@pytest.fixture(params=["one stream", "byte ranges on threads"])
def parse_path(request, monkeypatch):
    """Both ways of parsing a plain .csv: small files are one stream, large ones byte ranges on threads."""
    if request.param != "one stream":
        monkeypatch.setattr(challenge, "_MIN_RANGE_BYTES", 1 << 16)
        monkeypatch.setattr(challenge.os, "cpu_count", lambda: 3)
    return request.param


def test_byte_ranges_give_the_same_masks(tmp_path, realct_dir, parse_path):
    path, masks = _labels(tmp_path)
    assert len(challenge._line_ranges(path)) == (1 if parse_path == "one stream" else 3)
    assert np.array_equal(read_labels(path)[1], masks)
    _, real = read_labels(realct_dir / "Y_train.csv.gz")
    frame = pd.read_csv(realct_dir / "Y_train.csv.gz", index_col=0)
    assert np.array_equal(real.reshape(len(real), -1), frame.to_numpy().T)


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_read_labels_rejects(tmp_path, case, parse_path):
    path, _ = _labels(tmp_path)
    spoil, message = BAD_LABELS[case]
    spoil(path)
    with pytest.raises(FsctError) as err:
        read_labels(path, ["0.png", "1.png"])
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_read_labels_rejects_column_without_image(tmp_path):
    path, _ = _labels(tmp_path, columns=("0.png", "1.png", "7.png"))
    with pytest.raises(FsctError, match=r"Y\.csv: column '7\.png' has no matching image"):
        read_labels(path, ["0.png", "1.png", "2.png"])
    with pytest.raises(FsctError, match="label file not found"):
        read_labels(tmp_path / "absent.csv")


def test_column_to_image_by_name_stem_or_position():
    images = ["3.png", "4.png", "5.png"]
    assert column_to_image(["5.png", "3.png"], images) == [2, 0]
    assert column_to_image(["4", "5"], images) == [1, 2]
    # plain positions 0..n-1 of images named otherwise
    assert column_to_image(["0", "1", "2"], images) == [0, 1, 2]
    with pytest.raises(FsctError, match="column '9.png' has no matching image"):
        column_to_image(["3.png", "9.png"], images)
    with pytest.raises(FsctError, match="column '0' has no matching image"):
        column_to_image(["0", "1"], images)  # positions, but not one column per image


def test_write_labels_refuses_bad_masks(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        write_labels(tmp_path / "a.csv", np.full((1, 512, 512), 256), ["0.png"])
    with pytest.raises(ValueError, match="integer"):
        write_labels(tmp_path / "a.csv", np.zeros((1, 512, 512), np.float32), ["0.png"])
    with pytest.raises(ValueError, match="512"):
        write_labels(tmp_path / "a.csv", np.zeros((1, 256, 256), np.uint8), ["0.png"])
    assert not (tmp_path / "a.csv").exists()
    assert N_PIXELS == 512 * 512

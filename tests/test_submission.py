"""Submission files: byte-identical to the organisers' pandas call, read back, and validated."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsct.errors import FsctError
from fsct.submission import read_submission, validate_submission, write_submission
from tests.conftest import REPO, fsct_env

N_TEST = 3


def _masks(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 512, 512), np.int64)
    masks[:, 50:450, 60:400] = rng.integers(0, 256, (n, 400, 340))
    masks[:, 0, 0] = 255  # the widest label in the first row too
    return masks


@pytest.mark.parametrize("n", [1, 4])
def test_writer_is_byte_identical_to_pandas(tmp_path, n):
    masks = _masks(n, seed=n)
    write_submission(tmp_path / "ours.csv", masks)
    pd.DataFrame(masks.reshape(n, -1)).T.to_csv(tmp_path / "pandas.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_writer_with_column_names_is_byte_identical_to_pandas(tmp_path):
    masks = _masks(2).astype(np.uint8)
    write_submission(tmp_path / "ours.csv", masks, columns=["10.png", "11.png"])
    frame = pd.DataFrame(masks.reshape(2, -1)).T
    frame.columns = ["10.png", "11.png"]
    frame.to_csv(tmp_path / "pandas.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_round_trip(tmp_path):
    masks = _masks(3)
    write_submission(tmp_path / "s.csv", masks)
    columns, got = read_submission(tmp_path / "s.csv")
    assert columns == ["0", "1", "2"]
    assert got.dtype == np.uint8 and np.array_equal(got, masks)
    assert not [p for p in tmp_path.iterdir() if p.name != "s.csv"]  # no temporary file left behind
    write_submission(tmp_path / "s.csv.gz", masks)
    assert gzip.decompress((tmp_path / "s.csv.gz").read_bytes()) == (tmp_path / "s.csv").read_bytes()
    columns, got = read_submission(tmp_path / "s.csv.gz")
    assert columns == ["0", "1", "2"] and np.array_equal(got, masks)


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("X_test")
    for i in (20, 3, 100):  # numeric order: 3, 20, 100
        Image.fromarray(np.zeros((512, 512), np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def good_text(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "s.csv"
    write_submission(path, _masks(N_TEST, seed=7))
    return path.read_bytes()


def _replace_row(text: bytes, row: int, new: bytes) -> bytes:
    start = text.index(f"\n{row},".encode()) + 1
    end = text.index(b"\n", start)
    return text[:start] + new + text[end:]


def _spoil_value(value: bytes):
    return lambda t: _replace_row(t, 1000, b"1000,0," + value + b",0")


def _no_index(text: bytes) -> bytes:
    frame = pd.DataFrame(_masks(N_TEST, seed=7).reshape(N_TEST, -1)).T
    return frame.to_csv(index=False).encode()


MALFORMED = {
    "truncated": (lambda t: t[: t.index(b"\n200000,")], "200000 rows, expected 262144"),
    "extra_row": (lambda t: t + b"262144,0,0,0\n", "more than 262144 rows"),
    "no_index": (_no_index, "missing index column"),
    "index_pixel_names": (lambda t: _replace_row(t, 5, b"Pixel 5,0,0,0"), "first column is 'Pixel 5'"),
    "index_out_of_order": (lambda t: _replace_row(t, 9, b"8,0,0,0"), "expected pixel index 9"),
    "too_few_columns": (lambda t: t.replace(b",0,1,2\n", b",0,1\n", 1), "2 label columns, expected 3"),
    "too_many_columns": (lambda t: t.replace(b",0,1,2\n", b",0,1,2,3\n", 1), "4 label columns, expected 3"),
    "columns_out_of_order": (lambda t: t.replace(b",0,1,2\n", b",0,2,1\n", 1), "column 2 is named '2'"),
    "columns_not_positions": (lambda t: t.replace(b",0,1,2\n", b",a,b,c\n", 1), "column 1 is named 'a'"),
    "float": (_spoil_value(b"1.5"), "label '1.5' is not an integer"),
    "text": (_spoil_value(b"x"), "label 'x' is not an integer"),
    "negative": (_spoil_value(b"-3"), "label -3 is outside 0..255"),
    "too_big": (_spoil_value(b"256"), "label 256 is outside 0..255"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_validator_rejects(tmp_path, test_images, good_text, case):
    spoil, message = MALFORMED[case]
    path = tmp_path / "s.csv"
    path.write_bytes(spoil(good_text))
    with pytest.raises(FsctError) as err:
        validate_submission(path, test_images)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_validator_accepts_image_names_as_columns(tmp_path, test_images):
    path = tmp_path / "s.csv"
    write_submission(path, _masks(N_TEST), columns=["3.png", "20.png", "100.png"])
    validate_submission(path, test_images)
    write_submission(path, _masks(N_TEST), columns=["3", "100", "20"])
    with pytest.raises(FsctError, match="column 2 is named '100'"):
        validate_submission(path, test_images)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsct", "validate-submission", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=fsct_env(), timeout=120)


def test_cli_accepts_good_file(tmp_path, test_images, good_text):
    path = tmp_path / "s.csv"
    path.write_bytes(good_text)
    done = _cli(path, "--images", test_images)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: ok (3 slices)"


@pytest.mark.parametrize("case", ["truncated", "no_index", "columns_out_of_order", "float", "too_big"])
def test_cli_rejects_malformed_file(tmp_path, test_images, good_text, case):
    spoil, message = MALFORMED[case]
    path = tmp_path / "s.csv"
    path.write_bytes(spoil(good_text))
    done = _cli(path, "--images", test_images)
    assert done.returncode == 1
    assert message in done.stderr and str(path) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback

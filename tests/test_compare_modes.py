"""tools/compare_modes.py realct: the block split of a real-CT set, with slices left out by name."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import pytest

from fsct.data.challenge import list_images, read_labels
from fsct.errors import FsctError
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "data" / "realct"


def _make_realct():
    spec = importlib.util.spec_from_file_location("compare_modes", REPO / "tools" / "compare_modes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_realct


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("realct")
    shutil.copytree(FIXTURE / "X_train", root / "X_train")
    with gzip.open(FIXTURE / "Y_train.csv.gz", "rb") as f, open(root / "Y_train.csv", "wb") as out:
        shutil.copyfileobj(f, out)
    return root


def test_drop_leaves_slices_out_and_the_test_set_unchanged(src: Path, tmp_path: Path):
    make_realct = _make_realct()
    make_realct(src, tmp_path / "all", 5, False, 0, test_first=True)
    make_realct(src, tmp_path / "cut", 5, False, 0, test_first=True, drop=("9.png",))
    names = [p.name for p in list_images(tmp_path / "cut" / "X_train" / "images")]
    assert "9.png" not in names and "8.png" in names and len(names) == 6  # 5 labelled + the kept unlabelled
    cols, _ = read_labels(tmp_path / "cut" / "Y_train.csv")
    assert sorted(cols) == sorted(names)
    assert len(list_images(tmp_path / "all" / "X_train" / "images")) == 7
    # the test block is the same slices, renumbered the same way
    for name in ("Y_test.csv", "Y_test_classes.csv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


def test_drop_of_a_missing_slice_fails_naming_it(src: Path, tmp_path: Path):
    with pytest.raises(FsctError, match="99.png"):
        _make_realct()(src, tmp_path / "out", 5, False, 0, drop=("99.png",))
    assert not (tmp_path / "out").exists()

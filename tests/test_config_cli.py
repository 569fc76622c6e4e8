"""Config UX: every bad setting is one line naming its source and key, before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fsct.config import RANGES, Config, load_config, validate
from fsct.errors import FsctError

ROOT = Path(__file__).resolve().parents[1]


def fsct(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsct", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("override, expected", [
    ("train.best_metric=val/mio", "did you mean 'val/miou'"),
    ("episodes.mode=slices", "did you mean 'slice'"),
    ("model.variant=sed", "did you mean 'seed'"),
    ("predict.mode=partion", "did you mean 'partition'"),
    ("predict.partition_split=grop", "did you mean 'group'"),
    ("train.tracker=tensorbord", "did you mean 'tensorboard'"),
    ("train.mixed_precision=bf61", "not one of auto | no | bf16 | fp16"),
    ("episodes.mix={slice:0.5}", "episodes.mix='{slice: 0.5, superpixel: 0.5}'"),
    ("episodes.mix={slcie: 0.5}", "did you mean 'slice'"),
    ("episodes.n_wya=3", "did you mean 'episodes.n_way'"),
    ("train.max_steps=-5", "train.max_steps=-5 must be >= 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("episodes.n_way=0", "episodes.n_way=0 must be >= 1"),
    ("episodes.k_shot=0", "must be >= 1"),
    ("episodes.n_query=0", "must be >= 1"),
    ("data.image_size=100", "positive multiple of 32"),
])
def test_bad_override_is_one_line_naming_command_line(override: str, expected: str) -> None:
    with pytest.raises(FsctError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    msg = str(e.value)
    assert msg.startswith("command line: ") and expected in msg and "\n" not in msg


def test_bad_yaml_value_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    with pytest.raises(FsctError, match=f"^{bad}: optim.lr=-1.0 must be > 0$"):
        load_config(bad)
    bad.write_text("episodes:\n  n_way: many\n")
    with pytest.raises(FsctError, match=f"^{bad}: episodes.n_way='many' is not a valid int$"):
        load_config(bad)


def test_good_values_load() -> None:
    cfg = load_config(ROOT / "configs/demo.yaml", ["episodes.mix={slice: 0.5, superpixel: 0.5}",
                                                   "train.best_metric=val/ari_fg", "train.tracker=tensorboard"])
    assert cfg.episodes.mix == {"slice": 0.5, "superpixel": 0.5}
    assert cfg.train.best_metric == "val/ari_fg"


def test_defaults_and_shipped_configs_pass_the_ranges() -> None:
    validate(Config())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
    assert all("." in key for key in RANGES)


def test_train_refuses_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = fsct("train", "--config", str(ROOT / "configs/demo.yaml"), f"train.output_dir={out}", "train.max_steps=-5")
    assert r.returncode == 1
    assert r.stderr.strip() == "fsct train: error: command line: train.max_steps=-5 must be >= 1"
    assert not out.exists()


def test_mix_without_space_cli_message() -> None:
    r = fsct("train", "--config", "configs/demo.yaml", "episodes.mix={slice:0.5}", "--print-config")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "episodes.mix='{slice: 0.5, superpixel: 0.5}'" in r.stderr


def test_version_and_print_config() -> None:
    r = fsct("--version")
    assert r.returncode == 0 and r.stdout.startswith("fsct ")
    r = fsct("train", "--config", "configs/demo.yaml", "train.max_steps=7", "--print-config")
    assert r.returncode == 0 and "max_steps: 7" in r.stdout
    r = fsct("config", "show", "configs/demo.yaml", "optim.lr=0.5")
    assert r.returncode == 0 and "lr: 0.5" in r.stdout
    r = fsct("config", "show", "configs/demo.yaml", "train.best_metric=nope")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "train.best_metric" in r.stderr

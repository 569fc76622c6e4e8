"""tools/demo.py's pictures: slices from different body levels, and a training curve from metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from PIL import Image

from tests.conftest import REPO


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slices_spread_over_levels(tmp_path: Path):
    levels = [0.9, 0.1, 0.5, 0.52, 0.3, 0.0, 1.0, 0.7]
    (tmp_path / "synth.json").write_text(json.dumps({"slices": {"test": [
        {"name": f"{i}.png", "level": v} for i, v in enumerate(levels)]}}))
    picked = _demo().spread_over_levels(tmp_path, 4)
    assert picked[0] == 5 and picked[-1] == 6  # the top and the bottom level
    assert len(set(picked)) == 4 and [levels[i] for i in picked] == sorted(levels[i] for i in picked)


def test_training_curve_png(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": 2.0 / s} for s in range(1, 11)] + [
        {"step": 5, "val/miou": 0.3, "val/ari_fg": 0.5}, {"step": 10, "val/miou": 0.4, "val/ari_fg": 0.6}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = _demo().curve(tmp_path, run)
    im = Image.open(path)
    assert im.size == (720, 440) and len(im.getcolors(100_000)) > 3  # axes, lines and labels were drawn

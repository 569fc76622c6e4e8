"""tools/structure_view.py: per-structure split/merge figures on files written like a real run's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from fsct.data.challenge import write_labels
from fsct.submission import write_submission
from tests.conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("structure_view", REPO / "tools" / "structure_view.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((512, 512), np.uint8)
    truth[:100, :100] = 5  # liver: cut in two halves
    truth[200:300, 200:300] = 1  # spleen: kept whole but merged with the kidney below it
    truth[300:320, 200:300] = 2
    pred = np.zeros_like(truth)
    pred[:100, :50], pred[:100, 50:100] = 7, 8
    pred[200:320, 200:300] = 3
    return truth, pred


def test_structure_stats_split_and_merge():
    truth, pred = _case()
    stats = _tool().structure_stats(truth, pred)
    assert stats[5] == (0.5, 2, 1.0)  # split in two pieces, each pure
    whole, pieces, pure = stats[1]
    assert whole == 1.0 and pieces == 1 and abs(pure - 100 / 120) < 1e-9  # shares its region with the kidney
    assert stats[2][0] == 1.0 and abs(stats[2][2] - 20 / 120) < 1e-9  # the kidney is a sixth of that region


def test_cli_reads_truth_and_submissions(tmp_path: Path):
    truth, pred = _case()
    write_labels(tmp_path / "Y.csv", np.stack([truth, truth]), ["0.png", "1.png"])
    write_submission(tmp_path / "sub.csv", np.stack([pred, truth]), ["0.png", "1.png"])
    out = subprocess.run([sys.executable, str(REPO / "tools" / "structure_view.py"), "--truth", str(tmp_path / "Y.csv"),
                          "--names", "totalseg", "--pred", f"model={tmp_path / 'sub.csv'}"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()}
    assert "| 2 | 0.75 / 1.5 / 1.00 |" in rows["liver"]  # mean of (0.5, 2, 1) and (1, 1, 1) over two slices
    assert rows["spleen"].endswith("| 2 | 1.00 / 1.0 / 0.92 |")

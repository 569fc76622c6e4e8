"""`fsct score --pred FILE --truth Y_test.csv`: the official metric of a prediction file, and more.

Both files are label CSVs in the challenge layout (pixels x slices). The organisers pair slices by column
position, so this does too; when both headers hold names (e.g. "17.png", or "17": the ".png" is optional)
they must name the same slices in the same order, or the file is refused: a column-swapped file would
score one way here and another way on the leaderboard.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fsct import metrics
from fsct.atomic import atomic_file
from fsct.data.challenge import read_labels
from fsct.errors import FsctError

CAPTION_PER_CLASS = ("per-class IoU/Dice compare ids across files: meaningful only where ids are consistent "
                     "(synthetic data, realct-mini), not for the challenge's per-slice ids")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="predicted label CSV (submission layout)")
    parser.add_argument("--truth", required=True, type=Path, help="true label CSV (e.g. Y_test.csv)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--per-class", action="store_true", help="print per-class IoU and Dice")


def _is_positional(columns: list[str]) -> bool:
    return columns == [str(i) for i in range(len(columns))]


def _stem(name: str) -> str:
    return name[:-4] if name.lower().endswith(".png") else name


def match_slices(pred_path: Path, pred_cols: list[str], truth_path: Path,
                 truth_cols: list[str]) -> tuple[list[int], str]:
    """For each truth column, the index of its pred column (always its own position: names, when both files
    have them, must agree with positions), and how the pairing was checked (name|position)."""
    if len(pred_cols) != len(truth_cols):
        raise FsctError(f"{pred_path}: {len(pred_cols)} slices, but {truth_path} has {len(truth_cols)}")
    if _is_positional(pred_cols) or _is_positional(truth_cols):
        return list(range(len(truth_cols))), "position"
    by_name: dict[str, int] = {}
    for i, c in enumerate(pred_cols):
        if _stem(c) in by_name:
            raise FsctError(f"{pred_path}: columns '{pred_cols[by_name[_stem(c)]]}' and '{c}' name one slice")
        by_name[_stem(c)] = i
    for k, c in enumerate(truth_cols):
        if _stem(c) not in by_name:
            raise FsctError(f"{pred_path}: no column for slice '{c}' of {truth_path}")
        if by_name[_stem(c)] != k:
            raise FsctError(f"{pred_path}: column {k + 1} is '{pred_cols[k]}' but column {k + 1} of {truth_path} "
                            f"is '{c}': the organisers pair columns by position, so put them in the same order")
    return list(range(len(truth_cols))), "name"


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def score_files(pred_path: Path, truth_path: Path) -> dict[str, Any]:
    """Every number `fsct score` reports, as a JSON-ready dict."""
    truth_cols, truth = read_labels(truth_path)
    pred_cols, pred = read_labels(pred_path)
    order, matched_by = match_slices(pred_path, pred_cols, truth_path, truth_cols)
    if order != list(range(len(order))):
        pred = pred[order]
    per = metrics.slice_scores(truth, pred)
    seg = metrics.iou_dice(truth, pred)
    labelled = truth.reshape(len(truth), -1).any(axis=1)
    return {
        "pred": str(pred_path),
        "truth": str(truth_path),
        "n_slices": len(truth_cols),
        "matched_by": matched_by,
        "official": _stats(per["official"]),
        "n_empty_truth": int((~labelled).sum()),
        "official_labelled": _stats(per["official"][labelled]) if labelled.any() else None,
        "ari_all": _stats(per["ari_all"]),
        "rand_all": _stats(per["rand_all"]),
        "miou_bg": seg["miou_bg"],
        "miou_fg": seg["miou_fg"],
        "per_class": {str(c): {"iou": seg["iou"][c], "dice": seg["dice"][c]} for c in seg["classes"]},
        "per_slice": {
            "columns": truth_cols,
            "official": per["official"].tolist(),
            "ari_all": per["ari_all"].tolist(),
            "rand_all": per["rand_all"].tolist(),
        },
    }


def _print(result: dict[str, Any], per_class: bool) -> None:
    console = Console()
    table = Table(title=f"{result['pred']} vs {result['truth']} ({result['n_slices']} slices, "
                        f"matched by {result['matched_by']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("over")

    def mean_std(key: str) -> str:
        return f"{result[key]['mean']:.4f} ± {result[key]['std']:.4f}"

    table.add_row("[bold]official score[/bold] (ARI, truth foreground)",
                  f"[bold]{mean_std('official')}[/bold]", "mean ± std over slices")
    if result["n_empty_truth"]:
        # Such slices score 1.0 whatever is predicted (sklearn on empty arrays): show the mean without them.
        labelled = result["official_labelled"]
        value = "-" if labelled is None else f"{labelled['mean']:.4f} ± {labelled['std']:.4f}"
        table.add_row("official score, labelled slices only", value,
                      f"{result['n_slices'] - result['n_empty_truth']} slices; "
                      f"{result['n_empty_truth']} have no truth foreground (score 1.0)")
    table.add_row("ARI, all pixels", mean_std("ari_all"), "mean ± std over slices")
    table.add_row("Rand index, all pixels", mean_std("rand_all"), "mean ± std over slices")
    table.add_row("mIoU with background", f"{result['miou_bg']:.4f}", "pixels of all slices pooled")
    table.add_row("mIoU foreground", f"{result['miou_fg']:.4f}", "pixels of all slices pooled")
    table.caption = "mIoU compares ids across files: meaningful only where ids are consistent"
    console.print(table)
    if per_class:
        classes = Table(title="per class (all slices pooled)", caption=CAPTION_PER_CLASS)
        for name in ("id", "IoU", "Dice"):
            classes.add_column(name, justify="right")
        for c, v in result["per_class"].items():
            classes.add_row(c, f"{v['iou']:.4f}", f"{v['dice']:.4f}")
        console.print(classes)


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def run(args: argparse.Namespace) -> int:
    result = score_files(args.pred, args.truth)
    _print(result, args.per_class)
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    return 0

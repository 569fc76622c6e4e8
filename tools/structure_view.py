"""Per-structure view of partitions: which true structures a prediction splits, and which it merges.

  python tools/structure_view.py --truth Y_CLASSES.csv --names totalseg|SYNTH_JSON \
      --pred NAME=SUBMISSION.csv [--pred NAME=SUBMISSION.csv ...] [--min-slices 2]

The official score hides which structures fail. Y_CLASSES.csv holds the test masks with ids that name the
same structure on every slice: for a realct split, the Y_test_classes.csv that `tools/compare_modes.py
realct` writes (TotalSegmentator v2 ids: `--names totalseg`); for synthetic data, the Y_test.csv of the
same `fsct synth` command run with `--ids semantic` (same images and partitions; `--names` its synth.json).
For each structure, averaged over the test slices that hold it:

  whole   share of its pixels in the one predicted region holding most of them (1 = never split)
  pieces  predicted regions holding at least 5 % of it
  pure    share of that main region's truth-foreground pixels that are this structure (1 = never merged)

Prints a markdown table, one row per structure, the predictions side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fsct.data.challenge import read_labels
from fsct.submission import read_submission

SIDES = ("left", "right")
# TotalSegmentator v2 class ids (the realct-mini source's label ids).
TOTALSEG = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus",
    16: "trachea", 17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
    22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum",
    **{26 + i: f"vertebrae_{v}" for i, v in enumerate(
        ["S1", *[f"L{k}" for k in range(5, 0, -1)], *[f"T{k}" for k in range(12, 0, -1)],
         *[f"C{k}" for k in range(7, 0, -1)]])},
    51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right",
    56: "subclavian_artery_left", 57: "common_carotid_artery_right", 58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right", 61: "atrial_appendage_left",
    62: "superior_vena_cava", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein",
    65: "iliac_artery_left", 66: "iliac_artery_right", 67: "iliac_vena_left", 68: "iliac_vena_right",
    **{69 + 2 * i + j: f"{bone}_{side}" for i, bone in enumerate(
        ["humerus", "scapula", "clavicula", "femur", "hip"]) for j, side in enumerate(SIDES)},
    79: "spinal_cord",
    **{80 + 2 * i + j: f"{muscle}_{side}" for i, muscle in enumerate(
        ["gluteus_maximus", "gluteus_medius", "gluteus_minimus", "autochthon", "iliopsoas"])
       for j, side in enumerate(SIDES)},
    90: "brain", 91: "skull",
    **{92 + 12 * j + k: f"rib_{side}_{k + 1}" for j, side in enumerate(SIDES) for k in range(12)},
    116: "sternum", 117: "costal_cartilages",
}


def structure_stats(truth: np.ndarray, pred: np.ndarray) -> dict[int, tuple[float, int, float]]:
    """{structure id: (whole, pieces, pure)} for one slice; pixels outside truth foreground are ignored."""
    fg = truth > 0
    t, p = truth[fg].astype(np.int64), pred[fg].astype(np.int64)
    _, p = np.unique(p, return_inverse=True)
    table = np.zeros((int(t.max()) + 1 if t.size else 1, int(p.max()) + 1 if p.size else 1), np.int64)
    np.add.at(table, (t, p), 1)
    region_size = table.sum(0)
    stats = {}
    for sid in np.flatnonzero(table.sum(1)):
        row = table[sid]
        main = int(row.argmax())
        stats[int(sid)] = (row[main] / row.sum(), int((row >= 0.05 * row.sum()).sum()), row[main] / region_size[main])
    return stats


def view(truth: np.ndarray, preds: dict[str, np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
    """{prediction: {structure id: (n_slices, 3) rows of (whole, pieces, pure)}}."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, pred in preds.items():
        rows: dict[int, list[tuple[float, int, float]]] = {}
        for t, p in zip(truth, pred, strict=True):
            for sid, st in structure_stats(t, p).items():
                rows.setdefault(sid, []).append(st)
        out[name] = {sid: np.asarray(r, np.float64) for sid, r in rows.items()}
    return out


def load_names(spec: str) -> dict[int, str]:
    if spec == "totalseg":
        return TOTALSEG
    return {c["id"]: c["name"] for c in json.loads(Path(spec).read_text())["classes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", type=Path, required=True)
    p.add_argument("--names", required=True, help="totalseg, or a synth.json")
    p.add_argument("--pred", action="append", required=True, metavar="NAME=CSV")
    p.add_argument("--min-slices", type=int, default=2, help="structures on fewer test slices are left out")
    a = p.parse_args()
    cols, truth = read_labels(a.truth)
    preds = {}
    for spec in a.pred:
        name, path = spec.split("=", 1)
        pcols, masks = read_submission(path)
        if len(pcols) != len(cols):
            raise SystemExit(f"{path}: {len(pcols)} columns, {a.truth} has {len(cols)}")
        preds[name] = masks  # paired by position, as the organisers' scorer does
    names = load_names(a.names)
    stats = view(truth, preds)
    first = next(iter(stats.values()))
    print("| structure | slices | " + " | ".join(f"{n}: whole / pieces / pure" for n in preds) + " |")
    print("|---|---|" + "---|" * len(preds))
    for sid in sorted(first, key=lambda s: names.get(s, str(s))):
        if len(first[sid]) < a.min_slices:
            continue
        cells = [" / ".join(f"{v:.2f}" if k != 1 else f"{v:.1f}" for k, v in enumerate(stats[n][sid].mean(0)))
                 for n in preds]
        print(f"| {names.get(sid, f'id {sid}')} | {len(first[sid])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

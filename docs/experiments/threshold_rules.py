"""Ways to choose the boundary threshold from the val curve, scored on test: a question about the cliff.

Past its best threshold the learned partition's score falls off a cliff, and 4-6 val slices place that edge
a grid step or so from where test has it. A rule that prefers a threshold whose neighbours also score well
(the best worst case of a window, or the best smoothed score) should stay on the plateau. This script scores
such rules against the one training uses (val's best) on the curves `tools/threshold_sweep.py --json` wrote:

    python tools/threshold_sweep.py --model M --shards S --data D --json curves/GROUP_RUN_STEP.json
    python docs/experiments/threshold_rules.py curves/*.json

Each file holds the grid and the val and test curves of one checkpoint; files are grouped by the name's part
before the first '_' (e.g. a realct-mini block), and a run's checkpoints by the part before the last '_'.
Results: docs/RESULTS.md, "Choosing the threshold more cautiously: tried, no gain"."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def window(v: np.ndarray, width: int) -> np.ndarray:
    """(len(v), width) the curve around each threshold, edges repeated."""
    pad = np.pad(v, width // 2, mode="edge")
    return np.stack([pad[i:i + len(v)] for i in range(width)], 1)


RULES = {
    "val's best (training's rule)": lambda v: int(v.argmax()),
    "best worst of 3": lambda v: int(window(v, 3).min(1).argmax()),
    "best mean of 3": lambda v: int(window(v, 3).mean(1).argmax()),
    "best mean of 5": lambda v: int(window(v, 5).mean(1).argmax()),
    "lowest within 0.01 of the best": lambda v: int(np.nonzero(v >= v.max() - 0.01)[0].min()),
    "one step under val's best": lambda v: max(0, int(v.argmax()) - 1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("curves", nargs="+", type=Path)
    a = p.parse_args()
    groups: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    runs: dict[str, list] = collections.defaultdict(list)
    for f in sorted(a.curves):
        d = json.loads(f.read_text())
        v, t = np.asarray(d["val"]), np.asarray(d["test"])
        runs[f.stem.rsplit("_", 1)[0]].append((v, t))
        for name, rule in RULES.items():
            groups[f.stem.split("_")[0]][name].append(t[rule(v)])
        groups[f.stem.split("_")[0]]["test's best (an oracle)"].append(t.max())
    for group, rows in groups.items():
        base = np.asarray(rows["val's best (training's rule)"])
        print(f"{group} ({len(base)} checkpoints): test at the rule's threshold, mean")
        for name, scores in rows.items():
            s = np.asarray(scores)
            print(f"  {name:32s} {s.mean():.4f}   higher / lower than val's best: "
                  f"{int((s > base + 1e-4).sum())} / {int((s < base - 1e-4).sum())}")
    # The checkpoint training would ship under each rule: the one whose val score at the rule's threshold is best.
    for name, rule in RULES.items():
        shipped = []
        for run, cps in sorted(runs.items()):
            v, t = max(cps, key=lambda c: c[0][rule(c[0])])
            shipped.append(f"{run} {t[rule(v)]:.3f}")
        print(f"shipped, {name}: " + " | ".join(shipped))


if __name__ == "__main__":
    main()

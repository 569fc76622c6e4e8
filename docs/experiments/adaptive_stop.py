"""Per-slice stopping rules experiment (docs/RESULTS.md, "A per-slice stop"): does scaling the merge threshold
by a statistic of each slice's own maps make val's choice carry to other body levels?

  python docs/experiments/adaptive_stop.py --model CHECKPOINT --shards SHARDS --data DIR

The shipped rule cuts every slice's merge order at one threshold t (chosen on val), under the region floor.
On test slices of body levels the model trained less on, the best threshold is lower than val's (the maps
draw fainter borders there), so val's t merges structures. Each rule here cuts slice i at
t x s_i / mean(s over val) for a statistic s of the slice, t chosen on val as before:

  fixed   s = 1 (the shipped rule)
  height  the median height of the slice's merge order (the cost scale of its own merges)
  border  the border-length-weighted median boundary probability between its adjacent units
  p90     the 90th percentile of the boundary map inside the units (the brightness of its drawn borders)
  hfloor  the height of the merge that leaves as many units as the region floor (the cost of its last merges)

and `frac` cuts each slice after the same fraction of its merges, `count` at the same number of regions (the
region floor alone, no threshold). Printed per rule: test at val's choice,
test's best; with --per-slice, each test slice's best threshold beside its statistics.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from threshold_sweep import maps, test_slices, val_slices  # noqa: E402

from fsct.checkpoint import load_model  # noqa: E402
from fsct.metrics import official_score_slice  # noqa: E402
from fsct.partition import Hierarchy, border_strength, floored, hierarchy_partition, learned_hierarchies  # noqa: E402
from fsct.threshold import GRID  # noqa: E402

STATS = ("height", "border", "p90", "hfloor")
COUNTS = tuple(range(8, 49, 2))  # regions a slice is merged down to
FRACS = tuple(round(0.5 + 0.02 * i, 2) for i in range(25))  # 0.50 .. 0.98 of a slice's merges


def slice_stat(h: Hierarchy, prob: np.ndarray, name: str, floor: int) -> float:
    if name == "hfloor":  # the height of the merge that leaves `floor` units
        m = len(np.unique(h.units[h.units > 0])) - floor
        return float(h.merges[min(max(m, 1), len(h.merges)) - 1, 0])
    if name == "height":
        return float(np.median(h.merges[:, 0]))
    if name == "border":
        _, _, sums, counts = border_strength(h.units, prob)
        order = np.argsort(sums / counts)
        cum = np.cumsum(counts[order])
        return float((sums / counts)[order][np.searchsorted(cum, cum[-1] / 2)])
    return float(np.percentile(prob[h.units > 0], 90))


def scored(hier: list[Hierarchy], truth: np.ndarray, floor: int, min_region: int):
    """score(i, t): slice i's official score cut at threshold t under the floor, each cut computed once."""
    cuts = [functools.cache(functools.partial(hierarchy_partition, h, min_region=min_region,
                                              out_size=truth.shape[-1])) for h in hier]

    @functools.cache
    def score(i: int, t: float, regions: int = floor) -> float:
        return official_score_slice(truth[i], floored(cuts[i], t, regions))

    return score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--per-slice", action="store_true")
    a = p.parse_args()
    model, cfg = load_model(a.model)
    pc, sets = cfg.predict, {}
    for name, (images, truth) in (("val", val_slices(a.shards, cfg.data.val_split, 1000)),
                                  ("test", test_slices(a.data, 1000))):
        prob, emb = maps(model, cfg, images)
        hier = learned_hierarchies(prob, emb, pc.embedding_weight)
        work = torch.nn.functional.interpolate(prob.float()[:, None], size=hier[0].units.shape, mode="bilinear",
                                               align_corners=False)[:, 0].numpy()  # the map the units came from
        stats = {s: np.array([slice_stat(h, w, s, pc.min_regions) for h, w in zip(hier, work, strict=True)])
                 for s in STATS}
        sets[name] = (hier, scored(hier, truth, pc.min_regions, pc.min_region), stats)
    ref = {s: sets["val"][2][s].mean() for s in STATS}

    def curve(name: str, rule: str) -> np.ndarray:
        hier, score, stats = sets[name]
        if rule == "count":  # no threshold: the floor alone stops the merge
            return np.array([np.mean([score(i, 1.0, k) for i in range(len(hier))]) for k in COUNTS])
        if rule == "frac":
            return np.array([np.mean([score(i, float(h.merges[min(len(h.merges) - 1, int(f * len(h.merges))), 0]))
                                      for i, h in enumerate(hier)]) for f in FRACS])
        scale = np.ones(len(hier)) if rule == "fixed" else stats[rule] / ref[rule]
        return np.array([np.mean([score(i, round(float(t * s), 4)) for i, s in enumerate(scale)]) for t in GRID])

    print(f"{a.model}: saved threshold {pc.boundary_threshold}, floor {pc.min_regions}")
    for rule in ("fixed", *STATS, "frac", "count"):
        v, t = curve("val", rule), curve("test", rule)
        grid = {"frac": FRACS, "count": COUNTS}.get(rule, GRID)
        print(f"{rule:7s} val chooses {grid[int(v.argmax())]:.3f}: test {t[int(v.argmax())]:.4f} "
              f"(test best {t.max():.4f} at {grid[int(t.argmax())]:.3f})")
    if a.per_slice:
        for name in ("val", "test"):
            hier, score, stats = sets[name]
            for i in range(len(hier)):
                best = GRID[int(np.argmax([score(i, t) for t in GRID]))]
                print(f"{name} {i}: best t {best:.3f} " + " ".join(f"{s} {stats[s][i]:.3f}" for s in STATS))


if __name__ == "__main__":
    main()

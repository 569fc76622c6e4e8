"""Learned merge cost experiment (docs/RESULTS.md, "A learned merge cost: a better order, not a better stop"):
the learned partition's units merged in the order a logistic regression gives, against the shipped cost.

  python docs/experiments/learned_merge.py --model CHECKPOINT --shards SHARDS --data DIR

The shipped cost of two adjacent regions is 0.4 x their pooled border + 0.6 x their embedding distance
(fsct.partition.merge_sequence). Here the cost is 1 - p(same structure), p a logistic regression on seven
pooled pair features: border, embedding distance, the difference of mean and of standard deviation of
intensity, log of the smaller and of the larger size, border length over the smaller's sqrt size. It is fit
on the shards' train and val slices (--fit train: train alone) GALA-style (Nunez-Iglesias et al. 2013): the
pairs met while agglomerating, first in the shipped cost's order, then, refit with those added, in the fitted
cost's own order; a pair counts when both regions are mostly foreground, labelled "same" when their majority
labels agree. Both costs are then scored on DIR's test slices under the model's region floor, at the
threshold val chooses and at the one train+val choose, with test's own best beside them.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from threshold_sweep import maps, test_slices, val_slices  # noqa: E402

from fsct.checkpoint import load_model  # noqa: E402
from fsct.config import PredictConfig  # noqa: E402
from fsct.metrics import official_score_slice  # noqa: E402
from fsct.partition import WORK_SIZE, Hierarchy, border_strength, floored, hierarchy_partition, learned_units  # noqa: E402
from fsct.threshold import GRID  # noqa: E402

POOLED = ("size", "isum", "isq", "esum")


def _at_work(x: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.nn.functional.interpolate(x.float(), size=(WORK_SIZE, WORK_SIZE), mode=mode)


def slice_stats(units: np.ndarray, prob: np.ndarray, emb: np.ndarray, image: np.ndarray, truth: np.ndarray) -> dict:
    """Per-unit sums that pool as units merge (size, intensity, its square, embedding, truth label votes) and
    the units' pooled borders, all at WORK_SIZE."""
    n, u = int(units.max()) + 1, units.ravel()
    im = _at_work(torch.from_numpy(image)[None, None] / 255.0, "area")[0, 0].numpy().ravel()
    t = _at_work(torch.from_numpy(truth.astype(np.float32))[None, None], "nearest")[0, 0].long().numpy().ravel()
    esum = np.zeros((n, emb.shape[0]))
    np.add.at(esum, u, emb.reshape(emb.shape[0], -1).T.astype(np.float64))
    votes = np.zeros((n, 256))
    np.add.at(votes, (u, t), 1)
    a, b, bs, bc = border_strength(units, prob)
    return {"units": units, "size": np.bincount(u, minlength=n).astype(float), "isum": np.bincount(u, im, n),
            "isq": np.bincount(u, im * im, n), "esum": esum, "votes": votes, "pairs": (a, b, bs, bc)}


def features(st: dict, x: int, y: int, border: list[float]) -> np.ndarray:
    s, c = border
    nx, ny = st["size"][x], st["size"][y]
    mx, my = st["isum"][x] / nx, st["isum"][y] / ny
    sx, sy = (np.sqrt(max(st["isq"][r] / n - m * m, 0.0)) for r, n, m in ((x, nx, mx), (y, ny, my)))
    u, v = st["esum"][x], st["esum"][y]
    cos = float(u @ v) / (float(np.linalg.norm(u) * np.linalg.norm(v)) + 1e-12)
    small = min(nx, ny)
    return np.array([s / c, 1 - cos, abs(mx - my), abs(sx - sy), np.log(small), np.log(max(nx, ny)),
                     np.log(c) - 0.5 * np.log(small)])


def majority(votes: np.ndarray) -> int:
    """A region's majority foreground label, or -1 where most of it is background."""
    return int(votes[1:].argmax()) + 1 if votes[1:].sum() >= 0.5 * votes.sum() else -1


def agglomerate(sl: dict, cost: Callable[[np.ndarray], float]) -> tuple[np.ndarray, list]:
    """fsct.partition.merge_sequence with any cost of the pooled features -> (merge rows, [(features, same)]
    for every merge of two mostly-foreground regions)."""
    st = {k: sl[k].copy() for k in (*POOLED, "votes")}
    a, b, bs, bc = sl["pairs"]
    adj: dict[int, dict[int, list]] = {}
    for x, y, s, c in zip(a.tolist(), b.tolist(), bs.tolist(), bc.tolist(), strict=True):
        adj.setdefault(x, {})[y] = adj.setdefault(y, {})[x] = [s, c]
    version: dict[int, int] = {}
    heap: list = []

    def push(x: int, y: int) -> None:
        f = features(st, x, y, adj[x][y])
        heapq.heappush(heap, (cost(f), x, y, version.get(x, 0), version.get(y, 0), f))

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        push(x, y)
    rows, seen, height = [], [], 0.0
    while heap:
        c, x, y, vx, vy, f = heapq.heappop(heap)
        if version.get(x, 0) != vx or version.get(y, 0) != vy or y not in adj.get(x, {}):
            continue
        lx, ly = majority(st["votes"][x]), majority(st["votes"][y])
        if lx > 0 and ly > 0:
            seen.append((f, float(lx == ly)))
        height = max(height, c)
        rows.append((height, x, y))
        version[y], version[x] = -1, vx + 1
        for k in st:
            st[k][x] = st[k][x] + st[k][y]
        for z, border in adj.pop(y).items():
            del adj[z][y]
            if z != x:
                cur = adj[x].setdefault(z, [0.0, 0])
                cur[0] += border[0]
                cur[1] += border[1]
                adj[z][x] = cur
        for z in adj[x]:
            push(min(x, z), max(x, z))
    return np.array(rows, np.float64).reshape(-1, 3), seen


def shipped(emb_weight: float) -> Callable[[np.ndarray], float]:
    return lambda f: float((1 - emb_weight) * f[0] + emb_weight * f[1])


def logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> Callable[[np.ndarray], float]:
    """An L2-regularised logistic regression of y on standardised x (Newton steps) -> cost = 1 - p(same)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = l2 * np.diag(np.r_[np.ones(len(w) - 1), 0])
    for _ in range(100):
        p = 1 / (1 + np.exp(-z @ w))
        w -= np.linalg.solve((z * (p * (1 - p))[:, None]).T @ z / len(y) + reg, z.T @ (p - y) / len(y) + reg @ w)
    print(f"  fit on {len(y)} pairs ({y.mean():.2f} same): weights {np.round(w, 2).tolist()}")
    return lambda f: float(1 / (1 + np.exp(np.r_[(f - mu) / sd, 1.0] @ w)))


def curve(slices: list[dict], truths: np.ndarray, cost: Callable, cfg: PredictConfig) -> np.ndarray:
    """Official scores (thresholds, slices) of the partition merged by `cost`, as fsct.threshold does."""
    out = np.zeros((len(GRID), len(slices)))
    for j, (sl, tr) in enumerate(zip(slices, truths, strict=True)):
        h = Hierarchy(sl["units"], agglomerate(sl, cost)[0])
        cut_at = functools.cache(functools.partial(hierarchy_partition, h, min_region=cfg.min_region,
                                                   out_size=tr.shape[-1]))
        out[:, j] = [official_score_slice(tr, floored(cut_at, t, cfg.min_regions)) for t in GRID]
    return out


def load_slices(model: torch.nn.Module, cfg, images: torch.Tensor, truth: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """The slices' `slice_stats` under the model, and their truth."""
    prob, emb = maps(model, cfg, images)
    units, p = learned_units(prob)
    e = _at_work(emb, "bilinear").numpy()
    return [slice_stats(*s) for s in zip(units, p, e, images.numpy(), truth, strict=True)], truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a checkpoint or model dir (config.yaml beside it)")
    ap.add_argument("--shards", type=Path, required=True, help="the model's shards: train and val slices")
    ap.add_argument("--data", type=Path, required=True, help="DIR/X_test/images + DIR/Y_test.csv")
    ap.add_argument("--fit", choices=("train+val", "train"), default="train+val",
                    help="the slices the regression is fit on (train: val's threshold choice is not biased by it)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model, cfg = load_model(a.model, [])
    pc = cfg.predict
    sets = {s: load_slices(model, cfg, *val_slices(a.shards, s, 1000)) for s in (cfg.data.train_split,
                                                                                cfg.data.val_split)}
    sets["test"] = load_slices(model, cfg, *test_slices(a.data, 1000))
    fit_splits = (cfg.data.train_split,) + ((cfg.data.val_split,) if a.fit == "train+val" else ())
    fit = [sl for s in fit_splits for sl in sets[s][0]]
    costs = {"shipped": shipped(pc.embedding_weight)}
    pairs = [p for sl in fit for p in agglomerate(sl, costs["shipped"])[1]]
    first = logistic(np.array([f for f, _ in pairs]), np.array([s for _, s in pairs]))
    pairs += [p for sl in fit for p in agglomerate(sl, first)[1]]
    costs["learned"] = logistic(np.array([f for f, _ in pairs]), np.array([s for _, s in pairs]))
    for name, cost in costs.items():
        c = {s: curve(*sets[s], cost, pc) for s in sets}
        val = c[cfg.data.val_split].mean(1)
        both = np.concatenate([c[cfg.data.train_split], c[cfg.data.val_split]], 1).mean(1)
        test = c["test"].mean(1)
        i, j, k = int(val.argmax()), int(both.argmax()), int(test.argmax())
        print(f"{name}: test at val's threshold {GRID[i]:.3f}: {test[i]:.4f}; at train+val's {GRID[j]:.3f}: "
              f"{test[j]:.4f}; test's best {GRID[k]:.3f}: {test[k]:.4f}")


if __name__ == "__main__":
    main()

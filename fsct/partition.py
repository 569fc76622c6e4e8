"""Partition inference: a test slice has no support mask, so its prediction is a partition of the body.

`partition_split: group` (the default, measured best in docs/RESULTS.md): intensity superpixels of the
body (Felzenszwalb, fsct.data.superpixels) are the units, and the prototypes from train support only glue
together adjacent superpixels that they confidently (mean softmax probability >= `unexplained_threshold`)
give the same foreground class. What no prototype explains, and background, stays split by superpixels,
so unseen structures get regions of their own. Alternatives, measured worse: `superpixels` (every
confidently recognised pixel keeps its class, only the unexplained rest is cut by superpixels) and
`components` (the unexplained rest is cut into connected components only).

Either way a class that shows up as several disjoint blobs becomes one region per blob (left and right
kidney are different structures whatever the prototype says), regions under `min_region` pixels are merged
into the neighbour they share the longest border with, and ids are re-assigned: the largest blob of a
class keeps the class id, every other region takes an id the prediction does not use. The official score
is an ARI over the truth's foreground: only which pixels are grouped together counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import csgraph

from fsct.config import PredictConfig
from fsct.data.superpixels import body_mask, superpixels
from fsct.vote import Voters, agreement

MAX_ID = 255


def components(regions: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal non-zero values of an integer map: int32 (H,W) 1..n (0 stays 0),
    numbered in raster order. scikit-image's union-find: 14x faster than a scipy pixel graph at 512x512
    (3.0 vs 42 ms), same labels."""
    from skimage.measure import label

    out = label(regions, background=0, connectivity=1).astype(np.int32)
    return out, int(out.max())


def _neighbour_counts(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, count) for every ordered pair of different adjacent region ids (4-neighbours)."""
    pairs = []
    for x, y in ((regions[:, :-1], regions[:, 1:]), (regions[:-1], regions[1:])):
        diff = x != y
        pairs.append(np.stack([x[diff], y[diff]], 1))
        pairs.append(np.stack([y[diff], x[diff]], 1))
    p = np.concatenate(pairs).astype(np.int64)
    if len(p) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, counts = np.unique(p, axis=0, return_counts=True)
    return uniq[:, 0], uniq[:, 1], counts


def merge_small(regions: np.ndarray, min_size: int) -> np.ndarray:
    """Regions (ids >= 1; 0 = background, a region too) under `min_size` pixels join the neighbour they
    share the longest border with (background included: a speck at an organ's edge goes where it touches
    most). Repeats until no small region with a neighbour is left."""
    regions = regions.copy()
    for _ in range(8):
        n = int(regions.max()) + 1
        sizes = np.bincount(regions.ravel(), minlength=n)
        small = (sizes < min_size) & (sizes > 0)
        small[0] = False
        if not small.any():
            break
        a, b, c = _neighbour_counts(regions)
        sel = small[a]
        if not sel.any():
            break
        a, b, c = a[sel], b[sel], c[sel]
        # Prefer big neighbours: a small one absorbing another would leave a small region again.
        c = c + (~small[b]) * (1 << 40)
        order = np.lexsort((-c, a))
        a, b = a[order], b[order]
        first = np.r_[True, a[1:] != a[:-1]]
        lut = np.arange(n)
        lut[a[first]] = b[first]
        # A pair of small regions that chose each other: the larger id absorbs the smaller.
        mutual = lut[lut] == np.arange(n)
        mutual &= lut != np.arange(n)
        lut[mutual & (np.arange(n) > lut)] = np.arange(n)[mutual & (np.arange(n) > lut)]
        for _ in range(16):  # chains a -> b -> c resolve to c
            nxt = lut[lut]
            if np.array_equal(nxt, lut):
                break
            lut = nxt
        regions = lut[regions]
    return regions


def _cap(regions: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` non-zero regions: raise the merge floor until the smallest ones are gone."""
    for _ in range(16):
        sizes = np.bincount(regions.ravel())[1:]
        sizes = np.sort(sizes[sizes > 0])
        if len(sizes) <= limit:
            break
        regions = merge_small(regions, int(sizes[len(sizes) - limit - 1]) + 1)
    return regions


def explained(logits: torch.Tensor, threshold: float) -> np.ndarray:
    """Pixels a prototype (background included) claims with softmax probability >= threshold."""
    prob = torch.softmax(logits.float(), 0).amax(0)
    return (prob >= threshold).cpu().numpy()


def partition_slice(labels: np.ndarray, logits: torch.Tensor, feats: torch.Tensor, image: np.ndarray,
                    class_ids: np.ndarray, cfg: PredictConfig) -> np.ndarray:
    """Argmax ids (512,512) uint8 + logits (K+1,512,512) -> a partition (512,512) uint8, 0 outside the
    body (and, except in `group`, on confidently predicted background). `feats` (C,h,w) is used by
    `group` with `glue_cosine` > 0 only."""
    del class_ids  # ids come from `labels`
    labels = np.asarray(labels)
    body = body_mask(image)
    known = explained(logits, cfg.unexplained_threshold) if cfg.unexplained_threshold > 0 \
        else np.ones(labels.shape, bool)
    fg_known = known & (labels != 0)
    unexplained = body & ~known
    split = cfg.partition_split
    # `code`: one integer per (source, value), its connected pieces are the regions; `key`: the class id
    # a region may keep (<= 255) or "new id" (> 255).
    key = np.where(fg_known, labels.astype(np.int64), 0)
    if split == "superpixels":
        sp = superpixels(image, scale=cfg.sp_scale).astype(np.int64)
        key = np.where(unexplained, 256 + sp, key)
        key = np.where(unexplained & (sp == 0), 256 + 256, key)  # body pixels outside any segment
        code = key
    elif split == "components":
        key = code = np.where(unexplained, 256, key)
    elif split == "group":
        # Superpixels are the units; the prototypes only glue together adjacent superpixels that they
        # confidently (mean probability >= threshold) give one foreground class.
        sp = superpixels(image, scale=cfg.sp_scale).astype(np.int64)
        sp = np.where(body & (sp == 0), 256, sp)
        prob = torch.softmax(logits.float(), 0).amax(0).cpu().numpy()
        n_sp = int(sp.max()) + 1
        conf = np.bincount(sp.ravel(), prob.ravel(), n_sp) / np.maximum(np.bincount(sp.ravel(), minlength=n_sp), 1)
        votes = np.zeros((n_sp, 256), np.int64)
        np.add.at(votes, (sp.ravel(), labels.ravel()), 1)
        major = votes.argmax(1)
        glued = (conf >= cfg.unexplained_threshold) & (major != 0)
        unit = _glue_by_embedding(sp, feats, cfg.glue_cosine) if cfg.glue_cosine > 0 else np.arange(n_sp)
        key = np.where(sp > 0, np.where(glued[sp], major[sp], 256 + unit[sp]), 0)
        code = key
    else:
        raise ValueError(f"predict.partition_split={split!r} is not group, superpixels or components")
    regions, n = components(code)
    if n == 0:
        return np.zeros(labels.shape, np.uint8)
    regions = merge_small(regions, cfg.min_region)
    # Each class id is kept by one region at most; every other region needs an id the prediction lacks.
    n_free = MAX_ID - int((np.unique(labels) != 0).sum())
    n_classes = len(np.unique(key[(key > 0) & (key <= MAX_ID)]))
    regions = _cap(regions, min(MAX_ID, n_free + n_classes))
    return _assign_ids(regions, key, labels)


def _glue_by_embedding(sp: np.ndarray, feats: torch.Tensor, threshold: float) -> np.ndarray:
    """Superpixel -> unit: adjacent superpixels whose mean embeddings have cosine >= threshold are one unit
    (connected components of that graph: the episodes trained features to tell a slice's structures
    apart, so similar neighbours are taken as one structure cut by an intensity edge)."""
    n_sp = int(sp.max()) + 1
    f = torch.nn.functional.interpolate(feats.float()[None], size=(128, 128), mode="bilinear",
                                        align_corners=False)[0].flatten(1).cpu().numpy()  # (C, 128*128)
    step = sp.shape[0] // 128
    small = sp[step // 2::step, step // 2::step].ravel()
    counts = np.bincount(small, minlength=n_sp)
    means = np.stack([np.bincount(small, c, n_sp) for c in f], 1) / np.maximum(counts, 1)[:, None]
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-8
    a, b, _ = _neighbour_counts(sp)
    ok = (a > 0) & (b > 0) & (counts[a] > 0) & (counts[b] > 0)
    a, b = a[ok], b[ok]
    similar = (means[a] * means[b]).sum(1) >= threshold
    graph = sparse.coo_matrix((np.ones(int(similar.sum()), np.int8), (a[similar], b[similar])), shape=(n_sp, n_sp))
    return csgraph.connected_components(graph, directed=False)[1]


def _assign_ids(regions: np.ndarray, key: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Region -> output id: the largest blob of a recognised class keeps the class id; every other region
    takes the smallest id in 1..255 that the prediction does not use."""
    n = int(regions.max()) + 1
    sizes = np.bincount(regions.ravel(), minlength=n)
    # The key a region mostly carries (after merging, a region may hold a few pixels of others).
    flat_r, flat_k = regions.ravel(), key.ravel()
    sel = flat_r > 0
    pair, cnt = np.unique(np.stack([flat_r[sel], flat_k[sel]], 1), axis=0, return_counts=True)
    order = np.lexsort((-cnt, pair[:, 0]))
    pair = pair[order]
    first = np.r_[True, pair[1:, 0] != pair[:-1, 0]]
    region_key = np.zeros(n, np.int64)
    region_key[pair[first, 0]] = pair[first, 1]
    lut = np.zeros(n, np.int64)
    taken = np.zeros(MAX_ID + 1, bool)
    taken[np.unique(labels)] = True
    claimed: set[int] = set()
    for r in np.argsort(-sizes):  # biggest first: the main blob of a class keeps its id
        if r == 0 or sizes[r] == 0:
            continue
        k = int(region_key[r])
        if 0 < k <= MAX_ID and k not in claimed:
            lut[r] = k
            claimed.add(k)
    fresh = iter(np.flatnonzero(~taken[1:]) + 1)
    for r in range(1, n):
        if sizes[r] > 0 and lut[r] == 0:
            nxt = next(fresh, None)
            if nxt is None:  # more regions than free ids: the rest join the background
                break
            lut[r] = nxt
    return lut[regions].astype(np.uint8)


# -- learned partition: the model's boundary map cut into basins, basins merged by their borders ------------
WORK_SIZE = 256  # the boundary map is cut at this size, then upsampled (nearest) to the submission's 512
FLOOD_LEVELS = 20  # the watershed floods in this many rising levels of the boundary probability


def basins(prob: torch.Tensor) -> torch.Tensor:
    """Watershed seeds of boundary maps (B,H,W): the regional minima of the map quantised to FLOOD_LEVELS
    steps (connected plateaus no cell of which has a lower 8-neighbour), float labels, 0 elsewhere.
    Quantising makes an organ's noisy inside one plateau; every structure whose inside is lower than its rim
    gets a seed of its own, however small and whatever the map's calibration, and a thick ridge, which
    always slopes down somewhere, gets none. Plateaus are labelled by scikit-image on the CPU."""
    from skimage.measure import label

    q = torch.floor(prob * FLOOD_LEVELS)
    lower = (-torch.nn.functional.max_pool2d(-q[:, None], 3, 1, 1)[:, 0] < q).cpu().numpy()
    out = []
    for qi, low in zip(q.cpu().numpy().astype(np.int32), lower, strict=True):
        plateaus = label(qi + 1, background=0, connectivity=2)
        sloped = np.bincount(plateaus.ravel(), low.ravel(), int(plateaus.max()) + 1) > 0
        out.append(label(~sloped[plateaus], connectivity=2))
    return torch.from_numpy(np.stack(out)).float().to(prob.device)


def flood(seeds: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """A seeded watershed on the boundary map quantised to FLOOD_LEVELS levels; every cell ends labelled. On a
    CPU tensor scikit-image's priority-queue watershed floods it (~0.06 s per 256x256 slice); elsewhere
    `flood_torch` replays the same flood in tensor passes, cell for cell.

    scikit-image pops cells by (value, push order) and gives the seed cells one push order, so which seed
    pops first would be up to its heap's internals. Each seed cell's value is therefore lowered to just under
    its level, in raster order: the seeds of a level pop before the rest of it, in a defined order that the
    torch flood reproduces."""
    if seeds.device.type == "cpu":
        from skimage.segmentation import watershed

        q = torch.floor(prob * FLOOD_LEVELS).double().numpy()
        out = []
        for qi, si in zip(q, seeds.numpy(), strict=True):
            marked = si > 0
            n = int(marked.sum())
            qi[marked] -= 1 - (np.arange(1, n + 1) / (n + 1))
            out.append(watershed(qi, si.astype(np.int64), connectivity=2))
        return torch.from_numpy(np.stack(out)).float()
    return flood_torch(seeds, prob)


# scikit-image's neighbour order at connectivity 2: the edge neighbours, then the corners, each in raster order
_FLOOD_STEPS = ((-1, 0), (0, -1), (0, 1), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))


def flood_torch(seeds: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """`flood` in torch ops, on any device: the same labels as its CPU path.

    The priority flood labels a cell when the first of its neighbours pops, and pops cells by (level, age),
    age being the order of labelling (seed cells oldest, in raster order). Replayed level by level in rings:
    the labelled, unpopped cells at or under the level pop together; each unlabelled neighbour takes the
    label of the oldest of them (ties: the neighbour order); the new cells' ages follow (labeller's age,
    neighbour order), as their pushes would; new cells at or under the level are the next ring. Each pass
    touches only its ring's cells and their neighbours, so the whole flood costs ~8 index operations per
    cell, plus a few small kernels and one host sync per ring."""
    b, h, w = seeds.shape
    dev = seeds.device
    q = torch.floor(prob * FLOOD_LEVELS).reshape(-1)
    lab = seeds.reshape(-1).clone()
    n = lab.numel()
    age = torch.where(lab > 0, torch.arange(n, device=dev), n)  # seeds: raster order; ages of later cells > n
    pushed = n
    waiting = lab > 0  # labelled, not popped yet
    best = torch.full((n,), 8 * 3 * n, dtype=torch.long, device=dev)  # per-pass scratch, restored after use
    steps = torch.tensor(_FLOOD_STEPS, device=dev)
    for level in range(FLOOD_LEVELS + 1):
        ring = torch.nonzero(waiting & (q <= level))[:, 0]
        while len(ring):
            waiting[ring] = False
            y, x = (ring // w) % h, ring % w
            ny, nx = y[:, None] + steps[:, 0], x[:, None] + steps[:, 1]  # (R, 8)
            nb = ring[:, None] + steps[:, 0] * w + steps[:, 1]
            key = age[ring][:, None] * 8 + torch.arange(8, device=dev)  # (labeller's age, neighbour order)
            src = lab[ring][:, None].expand(-1, 8)
            ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            nb, key, src = nb[ok], key[ok], src[ok]
            free = lab[nb] == 0
            nb, key, src = nb[free], key[free], src[free]
            best.scatter_reduce_(0, nb, key, "amin")
            won = key == best[nb]  # keys are unique: one winner per cell
            cells, key = nb[won], key[won]
            best[cells] = 8 * 3 * n
            lab[cells] = src[won]
            order = torch.argsort(key)
            age[cells[order]] = pushed + torch.arange(len(cells), device=dev)
            pushed += len(cells)
            waiting[cells] = True
            ring = cells[q[cells] <= level]
    return lab.reshape(b, h, w)


@dataclass
class Hierarchy:
    """One slice's units (an over-segmentation, ids >= 1; 0, outside them, stays 0) and the order in which
    pooled borders merge them: every threshold's partition is a prefix of `merges`, so a whole threshold grid
    costs one agglomeration."""

    units: np.ndarray  # (H,W) int64
    merges: np.ndarray  # (M,3) float64 rows (height, kept id, merged id); heights never decrease


def merge_sequence(units: np.ndarray, prob: np.ndarray, emb: np.ndarray | None = None,
                   emb_weight: float = 0.0, voters: Voters | None = None) -> np.ndarray:
    """Greedy agglomeration of adjacent units (ids > 0) run to the end: repeatedly merge the pair with the
    lowest cost, borders and embeddings pooled as regions merge. -> (M,3) rows (height, kept, merged), height =
    the highest cost merged so far, so stopping at threshold t is the prefix of rows with height < t.

    cost = (1 - emb_weight) * mean boundary probability on the pair's shared border
           + emb_weight * (1 - cosine of the two regions' mean embeddings)   (emb: (C,H,W), units' size).
    Pooling (not one-shot thresholding) keeps one weak spot in a long border from gluing two structures. The
    embedding term weighs a region's whole content, not its rim: two organs whose border the map draws faintly
    still differ in it. With it, the threshold val chooses carries to test slices of other body levels,
    where the border alone needed a different threshold at each level (docs/RESULTS.md).

    With `voters` (fsct/vote.py, needs emb), cost = (1 - w) x the cost above + w x (1 - agree), w =
    voters.weight: whether the labelled support slices call the two regions the same structure."""
    import heapq

    a, b, sums, counts = border_strength(units, prob)
    w = float(emb_weight) if emb is not None else 0.0
    vote = voters if emb is not None and voters is not None and voters.weight > 0 else None
    vec = votes = None
    if w > 0 or vote is not None:
        n = int(units.max()) + 1
        flat = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).reshape(emb.shape[0], -1).T
        sums_e = torch.zeros(n, emb.shape[0]).index_add_(0, torch.from_numpy(units.ravel()), flat).double()
        vec = dict(enumerate(sums_e.numpy()))
        if vote is not None:  # a region's vote changes only when it grows: kept per region
            votes = dict(enumerate(vote.probs(sums_e)))
    adj: dict[int, dict[int, list[float]]] = {}
    for x, y, s, c in zip(a.tolist(), b.tolist(), sums.tolist(), counts.tolist(), strict=True):
        adj.setdefault(x, {})[y] = [s, c]
        adj.setdefault(y, {})[x] = [s, c]

    def cost(x: int, y: int) -> float:
        s, c = adj[x][y]
        base = s / c
        if w > 0:
            u, v = vec[x], vec[y]
            cos = float(u @ v) / (float(np.linalg.norm(u) * np.linalg.norm(v)) + 1e-12)
            base = (1.0 - w) * base + w * (1.0 - cos)
        if votes is None:
            return base
        agree = float(agreement(votes[x][None], votes[y][None])[0])
        return (1.0 - vote.weight) * base + vote.weight * (1.0 - agree)

    version: dict[int, int] = {}
    heap = [(cost(x, y), x, y, 0, 0) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    heapq.heapify(heap)
    rows, height = [], 0.0
    while heap:
        c, x, y, vx, vy = heapq.heappop(heap)
        if version.get(x, 0) != vx or version.get(y, 0) != vy or y not in adj.get(x, {}):
            continue  # stale: one side merged or grew since this entry was pushed; its current cost is queued
        height = max(height, c)
        rows.append((height, x, y))
        version[y] = -1
        version[x] = vx + 1
        if vec is not None:
            vec[x] = vec[x] + vec.pop(y)
        if votes is not None:
            votes.pop(y)
            votes[x] = vote.probs(torch.from_numpy(vec[x])[None])[0]
        for z, (sz, cz) in adj.pop(y).items():
            del adj[z][y]
            if z == x:
                continue
            cur = adj[x].setdefault(z, [0.0, 0])
            cur[0] += sz
            cur[1] += cz
            adj[z][x] = cur
        for z in adj[x]:  # every neighbour of the grown region: its border or its content changed
            lo, hi = min(x, z), max(x, z)
            heapq.heappush(heap, (cost(lo, hi), lo, hi, version.get(lo, 0), version.get(hi, 0)))
    return np.array(rows, np.float64).reshape(-1, 3)


def cut(units: np.ndarray, merges: np.ndarray, threshold: float) -> np.ndarray:
    """The units merged by every row of `merges` under `threshold` (0 stays 0)."""
    parent = np.arange(int(units.max()) + 1)
    n = int(np.searchsorted(merges[:, 0], threshold, side="left"))
    for _, x, y in merges[:n].astype(np.int64):
        parent[y] = x
    for _ in range(64):  # pointer chains from successive merges
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    return parent[units]


def learned_units(boundary: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Boundary probabilities (B,h,w) -> the learned partition's units, the watershed basins of the map at
    WORK_SIZE (`flood`), int64 (B,WORK_SIZE,WORK_SIZE), and the map at that size (CPU)."""
    prob = _work(boundary.float()[:, None])[:, 0]
    return flood(basins(prob), prob).cpu().numpy().astype(np.int64), prob.cpu().numpy()


def learned_hierarchies(boundary: torch.Tensor, emb: torch.Tensor | None = None,
                        emb_weight: float = 0.0, voters: Voters | None = None) -> list[Hierarchy]:
    """Boundary probabilities (B,h,w) and, with emb_weight > 0 or `voters`, embeddings (B,C,h',w') -> per
    slice, the learned units (`learned_units`) and their merge order (CPU)."""
    units, prob = learned_units(boundary)
    vote = voters.to("cpu") if voters is not None and voters.weight > 0 else None
    out = []
    for i, (u, p) in enumerate(zip(units, prob, strict=True)):
        use = emb is not None and (emb_weight > 0 or vote is not None)
        e = _work(emb[i:i + 1].float())[0].cpu().numpy() if use else None
        out.append(Hierarchy(u, merge_sequence(u, p, e, emb_weight, vote)))
    return out


def _work(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False)


def min_cells(min_region: int, size: int) -> int:
    """`min_region` (pixels of a 512x512 slice) in cells of a size x size grid, at least 1."""
    return max(1, round(min_region * (size / 512) ** 2))


def hierarchy_partition(h: Hierarchy, threshold: float, min_region: int, out_size: int = 512) -> np.ndarray:
    """One slice's partition at a threshold: merged units, regions under `min_region` pixels (at 512x512)
    joined to their longest-border neighbour, at most 255 -> uint8 (out_size, out_size), ids 1..n (0 where
    the units have none)."""
    regions, _ = components(cut(h.units, h.merges, threshold))
    regions = _cap(merge_small(regions, min_cells(min_region, regions.shape[-1])), MAX_ID)
    _, compact = np.unique(regions, return_inverse=True)
    part = (compact.reshape(regions.shape) + (regions.min() > 0)).astype(np.uint8)
    if part.shape[-1] == out_size:
        return part
    up = torch.nn.functional.interpolate(torch.from_numpy(part)[None, None].float(), size=(out_size, out_size),
                                         mode="nearest")
    return up[0, 0].to(torch.uint8).numpy()


def floored(cut_at: Callable[[float], np.ndarray], threshold: float, min_regions: int) -> np.ndarray:
    """`cut_at(threshold)` (a partition, ids 1..n), or where it has fewer than `min_regions` regions, the first
    partition of the grid's lower thresholds (`fsct.threshold.ladder`) that has as many, else the lowest's.

    Past a model's best threshold the score falls off a cliff: large structures merge within a step or two
    of the grid, and a threshold chosen on a few val slices of one body level lands past the cliff on other
    levels (docs/RESULTS.md). A slice cut into fewer regions than a labelled slice has structures has merged
    structures for sure, so the floor stops it there; splitting costs the score far less than merging."""
    from fsct.threshold import ladder

    for t in ladder(threshold, min_regions):
        part = cut_at(t)
        if int(part.max()) >= min_regions:
            return part
    return part


def learned_partition(boundary: torch.Tensor, cfg: PredictConfig, out_size: int = 512,
                      emb: torch.Tensor | None = None, voters: Voters | None = None) -> np.ndarray:
    """Boundary probabilities (B,h,w) (+ embeddings (B,C,h,w) for cfg.embedding_weight > 0) -> partitions
    (B,out_size,out_size) uint8, ids 1..n per slice.

    The map's watershed basins (every structure whose inside is lower than its rim gets one) are merged
    while their merge cost (pooled border, and embedding distance) stays under `boundary_threshold`: borders
    follow the model, not intensity; with `voters` (fsct/vote.py) the labelled support slices vote on every
    merge. With `partition_ops` torch (auto: on a GPU) the same partition comes from batched tensor ops on
    the maps' device (fsct.partition_torch)."""
    ops = cfg.partition_ops
    if ops == "torch" or (ops == "auto" and boundary.device.type != "cpu"):
        from fsct.partition_torch import learned_partition_torch

        return learned_partition_torch(boundary, cfg.boundary_threshold, cfg.min_region, out_size, emb,
                                       cfg.embedding_weight, cfg.min_regions, voters).cpu().numpy()
    return np.stack([floored_hierarchy_partition(h, cfg, out_size)
                     for h in learned_hierarchies(boundary, emb, cfg.embedding_weight, voters)])


def floored_hierarchy_partition(h: Hierarchy, cfg: PredictConfig, out_size: int) -> np.ndarray:
    """`hierarchy_partition` at cfg.boundary_threshold under the cfg.min_regions floor (`floored`)."""
    return floored(lambda t: hierarchy_partition(h, t, cfg.min_region, out_size), cfg.boundary_threshold,
                   cfg.min_regions)


def border_strength(sp: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every pair of 4-adjacent superpixels (ids > 0) of (H,W) maps: (a, b, sum of the boundary
    probability on both sides of their shared border, number of such pixels), a < b."""
    a_list, b_list, p_list = [], [], []
    for x, y, px, py in ((sp[:, :-1], sp[:, 1:], prob[:, :-1], prob[:, 1:]), (sp[:-1], sp[1:], prob[:-1], prob[1:])):
        cut = (x != y) & (x > 0) & (y > 0)
        a_list.append(np.minimum(x[cut], y[cut]))
        b_list.append(np.maximum(x[cut], y[cut]))
        p_list.append(0.5 * (px[cut] + py[cut]))
    a, b, p = (np.concatenate(v) for v in (a_list, b_list, p_list))
    n = int(sp.max()) + 1
    pair = a.astype(np.int64) * n + b
    uniq, inverse, count = np.unique(pair, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, p, len(uniq))
    return uniq // n, uniq % n, sums, count


def body_superpixels(image: np.ndarray, scale: float) -> np.ndarray:
    """Felzenszwalb superpixels of the body, every body pixel in one (int64, 0 outside the body)."""
    sp = superpixels(image, scale=scale).astype(np.int64)
    return np.where(body_mask(image) & (sp == 0), int(sp.max()) + 1, sp)


def boundary_hierarchy(image: np.ndarray, prob: np.ndarray, cfg: PredictConfig) -> Hierarchy:
    """`partition_split: boundary`: body superpixels (Felzenszwalb) snap the edges, the model's boundary map
    (prob, float, the image's size) decides which of them belong together."""
    sp = body_superpixels(image, cfg.sp_scale)
    return Hierarchy(sp, merge_sequence(sp, prob))


def boundary_merge_slice(image: np.ndarray, prob: np.ndarray, cfg: PredictConfig) -> np.ndarray:
    """The `boundary` partition at cfg.boundary_threshold -> uint8, the image's size, 0 outside the body."""
    return floored_hierarchy_partition(boundary_hierarchy(image, prob, cfg), cfg, image.shape[-1])

"""The learned partition at one threshold as batched torch ops, for the model's device.

`fsct.partition` builds each slice's whole merge order on the CPU (a Python heap, one slice at a time), so
a validation grid of thresholds costs one agglomeration. Prediction needs one threshold only, and on a GPU
the per-slice Python would cap the throughput. Here a whole batch is one graph (each slice's ids offset
into its own range) and every stage is a few tensor ops per pass, the same result as the CPU path:

- `basins_torch`: `fsct.partition.basins`'s regional minima, labelled by `label_components` (parallel
  union-find) in the same raster order;
- `fsct.partition.flood_torch`: the CPU path's seeded watershed, cell for cell;
- `merge_below`: the greedy merge order of `fsct.partition.merge_sequence`, cut at the threshold: each pass
  merges every slice's cheapest adjacent pair, so the passes are as many as the most merges in one slice
  (~100), not their sum over the batch;
- `merge_small_torch`, `cap_torch`, `compact`: `fsct.partition.merge_small`, `_cap` and the renumbering
  of `hierarchy_partition`, pass for pass.

docs/PERFORMANCE.md: identical partitions to the CPU path on real CT, and what is measured of the speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsct.partition import FLOOD_LEVELS, MAX_ID, WORK_SIZE, _work, flood_torch, min_cells
from fsct.threshold import ladder
from fsct.vote import Voters, agreement

# Half of each neighbourhood: the other half is the same pairs seen from the other cell.
_HALF_NEIGHBOURS = {8: [(0, 1), (1, 0), (1, 1), (1, -1)], 4: [(0, 1), (1, 0)]}
_ALL = slice(None)
# (B,H,W) index pairs of horizontal and vertical neighbours
_ADJACENT = (((_ALL, _ALL, slice(None, -1)), (_ALL, _ALL, slice(1, None))),
             ((_ALL, slice(None, -1), _ALL), (_ALL, slice(1, None), _ALL)))


def label_components(values: torch.Tensor, mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """8- (or 4-) connected components of equal `values` among the `mask` cells of (B,H,W) maps -> int64
    labels, unique over the whole batch (the smallest flat index + 1 of the component's cells: renumbered in
    sorted order they are scikit-image's raster order), 0 outside the mask.

    Union-find in parallel passes: every pair of linked cells hooks the larger of its two roots under the
    smaller, then every cell jumps to its root. A root only ever points at a smaller cell of its own
    component, so the smallest cell ends as the root; a handful of passes settle a slice (min-label
    propagation alone needed ~300 on a 256x256 slice's air plateau)."""
    b, h, w = values.shape
    flat = torch.arange(b * h * w, device=values.device).reshape(b, h, w)
    links = []
    for dy, dx in _HALF_NEIGHBOURS[connectivity]:
        ys, yd = slice(0, h - dy), slice(dy, h)
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        ok = mask[:, ys, xs] & mask[:, yd, xd] & (values[:, ys, xs] == values[:, yd, xd])
        links.append((flat[:, ys, xs][ok], flat[:, yd, xd][ok]))
    p = torch.cat([x for x, _ in links])
    q = torch.cat([y for _, y in links])
    root = flat.reshape(-1).clone()
    while True:
        rp, rq = root[p], root[q]
        differ = rp != rq
        if not bool(differ.any()):
            break
        p, q, rp, rq = p[differ], q[differ], rp[differ], rq[differ]  # settled links stay settled
        root.scatter_reduce_(0, torch.maximum(rp, rq), torch.minimum(rp, rq), "amin")
        while True:
            nxt = root[root]
            if torch.equal(nxt, root):
                break
            root = nxt
    return torch.where(mask, root.reshape(b, h, w) + 1, 0)


def basins_torch(prob: torch.Tensor) -> torch.Tensor:
    """`fsct.partition.basins` on the device: the regional minima of the boundary maps (B,H,W) quantised to
    FLOOD_LEVELS steps, labelled 1..n per slice in raster order (float, as `flood_torch` takes them), 0
    elsewhere."""
    q = torch.floor(prob * FLOOD_LEVELS)
    lower = -F.max_pool2d(-q[:, None], 3, 1, 1)[:, 0] < q
    plateaus = label_components(q, torch.ones_like(q, dtype=torch.bool))
    sloped = torch.zeros(plateaus.numel() + 1, dtype=torch.long, device=q.device)
    sloped.scatter_reduce_(0, plateaus.reshape(-1), lower.reshape(-1).long(), "amax")
    minima = sloped[plateaus] == 0
    seeds = label_components(torch.zeros_like(q), minima)
    return compact(seeds).float()


def _global_ids(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-slice ids (B,H,W) >= 0 -> ids unique over the batch (slice b's id i -> b * stride + i), stride."""
    stride = int(labels.max()) + 1
    offset = torch.arange(labels.shape[0], device=labels.device)[:, None, None] * stride
    return labels.long() + offset, stride


def _pairs(labels: torch.Tensor, values: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every 4-adjacent pair of cells with different labels: (a, b, 0.5 * (value_a + value_b)), a < b."""
    a, b, v = [], [], []
    for i, j in _ADJACENT:
        x, y = labels[i], labels[j]
        d = x != y
        a.append(torch.minimum(x[d], y[d]))
        b.append(torch.maximum(x[d], y[d]))
        if values is not None:
            v.append(0.5 * (values[i][d] + values[j][d]))
    return torch.cat(a), torch.cat(b), torch.cat(v) if values is not None else None


def _coalesce(a: torch.Tensor, b: torch.Tensor, n: int, *sums: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Edges (a < b, ids < n) with per-edge values -> one edge per pair, the values summed."""
    key, inv = torch.unique(a * n + b, return_inverse=True)
    out = [torch.zeros(len(key), dtype=s.dtype, device=s.device).index_add_(0, inv, s) for s in sums]
    return key // n, key % n, out


def _agree(voters: Voters, vec: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """`fsct.vote.agreement` of the regions a and b of each edge (summed embeddings `vec`), in chunks of
    edges: one (chunk, J, S) block of support probabilities at a time."""
    out = [agreement(voters.probs(vec[a[i:i + chunk]]), voters.probs(vec[b[i:i + chunk]]))
           for i in range(0, len(a), chunk)]
    return torch.cat(out) if out else vec.new_zeros(0)


def merge_below(units: torch.Tensor, prob: torch.Tensor, threshold: float, emb: torch.Tensor | None = None,
                emb_weight: float = 0.0, voters: Voters | None = None) -> torch.Tensor:
    """Units (B,H,W) int (ids >= 1; 0 is never merged) merged while an adjacent pair costs under `threshold`
    -> region ids (B,H,W) int64, unique over the batch. The cost is `fsct.partition.merge_sequence`'s:
    (1 - emb_weight) * mean boundary probability on the shared border + emb_weight * (1 - cosine of the mean
    embeddings), emb (B,C,H,W) at the units' size; with `voters`, (1 - w) x that + w x (1 - the support
    slices' agreement), w = voters.weight."""
    ids, stride = _global_ids(units)
    n = units.shape[0] * stride
    a, b, p = _pairs(ids, prob.float())  # halved in float32 and summed in float64, as border_strength does
    p = p.double()
    local_zero = torch.arange(n, device=ids.device) % stride == 0
    ok = ~local_zero[a] & ~local_zero[b]
    a, b, (s, c) = _coalesce(a[ok], b[ok], n, p[ok], torch.ones_like(p[ok]))
    w = float(emb_weight) if emb is not None else 0.0
    vote = voters.to(ids.device) if emb is not None and voters is not None and voters.weight > 0 else None
    vec = agree = None
    if w > 0 or vote is not None:
        # summed in float32 as merge_sequence sums them, merged and compared in float64
        flat = emb.float().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        vec = torch.zeros(n, emb.shape[1], device=ids.device).index_add_(0, ids.reshape(-1), flat).double()
    if vote is not None:  # per edge; recomputed only for the edges of regions that grew
        agree = _agree(vote, vec, a, b)
    root = torch.arange(n, device=ids.device)
    slice_of = torch.arange(n, device=ids.device) // stride
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=ids.device)
    while len(a):
        cost = s / c
        if w > 0:  # merge_sequence's cost, operation for operation: near-ties fall the same way
            u, v = vec[a], vec[b]
            cos = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1) + 1e-12)
            cost = (1.0 - w) * cost + w * (1.0 - cos)
        if vote is not None:
            cost = (1.0 - vote.weight) * cost + vote.weight * (1.0 - agree)
        # each slice's cheapest pair, ties to the smallest (a, b): the pair merge_sequence's heap pops next
        sl = slice_of[a]
        low = inf.expand(units.shape[0]).clone().scatter_reduce(0, sl, cost, "amin")
        cand = (cost == low[sl]) & (cost < threshold)
        if not bool(cand.any()):
            break
        key = torch.where(cand, a * n + b, n * n)
        first = torch.full((units.shape[0],), n * n, device=ids.device).scatter_reduce(0, sl, key, "amin")
        sel = cand & (key == first[sl])
        lab = torch.arange(n, device=ids.device)
        a_sel = a[sel]
        lab[b[sel]] = a_sel  # a < b: the smaller id is kept
        root = lab[root]
        if vec is not None:
            vec = vec.index_add(0, a_sel, vec[b[sel]])
        a, b = lab[a], lab[b]
        live = a != b
        a, b = torch.minimum(a[live], b[live]), torch.maximum(a[live], b[live])
        if vote is None:
            a, b, (s, c) = _coalesce(a, b, n, s[live], c[live])
            continue
        a, b, (s, c, agree) = _coalesce(a, b, n, s[live], c[live], agree[live])
        grown = torch.zeros(n, dtype=torch.bool, device=ids.device)
        grown[a_sel] = True
        touched = grown[a] | grown[b]  # their sums above are stale; every other edge is one entry, unchanged
        agree[touched] = _agree(vote, vec, a[touched], b[touched])
    return root[ids]


def merge_small_torch(regions: torch.Tensor, min_size: torch.Tensor | int) -> torch.Tensor:
    """`fsct.partition.merge_small` on a batch of id maps (B,H,W) int, ids unique over the batch (a slice's
    region 0 is the one whose id is a multiple of the stride `_global_ids` gave it: background, never merged
    but a possible target), `min_size` per slice (B,) or one int. Regions under it join the neighbour they
    share the longest border with (a big one before a small one; ties to the smaller id), a pair of small
    regions that chose each other joins the larger id, chains resolve; up to 8 passes."""
    b = regions.shape[0]
    ids, stride = _global_ids(regions)
    n = b * stride
    floor = torch.as_tensor(min_size, device=ids.device).expand(b).repeat_interleave(stride)
    local_zero = torch.arange(n, device=ids.device) % stride == 0
    ar = torch.arange(n, device=ids.device)
    for _ in range(8):
        sizes = torch.bincount(ids.reshape(-1), minlength=n)
        small = (sizes < floor) & (sizes > 0) & ~local_zero
        if not bool(small.any()):
            break
        x, y, _ = _pairs(ids)
        # ordered pairs both ways, counted: the numpy version's (a, b, count)
        x, y = torch.cat([x, y]), torch.cat([y, x])
        key, count = torch.unique(x * n + y, return_counts=True)
        x, y = key // n, key % n
        sel = small[x]
        if not bool(sel.any()):
            break
        x, y, count = x[sel], y[sel], count[sel]
        score = count + (~small[y]).long() * (1 << 40)
        top = torch.zeros(n, dtype=score.dtype, device=ids.device).scatter_reduce(0, x, score, "amax")
        pick = score == top[x]
        target = torch.full((n,), n, dtype=torch.long, device=ids.device).scatter_reduce(
            0, x[pick], y[pick], "amin")
        lut = torch.where(target < n, target, ar)
        mutual = (lut[lut] == ar) & (lut != ar)
        lut = torch.where(mutual & (ar > lut), ar, lut)
        for _ in range(16):  # chains a -> b -> c resolve to c
            nxt = lut[lut]
            if torch.equal(nxt, lut):
                break
            lut = nxt
        ids = lut[ids]
    return ids - (torch.arange(b, device=ids.device) * stride)[:, None, None]


def cap_torch(regions: torch.Tensor, limit: int) -> torch.Tensor:
    """`fsct.partition._cap` per slice: at most `limit` non-zero regions, the smallest merged away first."""
    for _ in range(16):
        ids, stride = _global_ids(regions)
        b = regions.shape[0]
        sizes = torch.bincount(ids.reshape(-1), minlength=b * stride).reshape(b, stride)[:, 1:]
        present = (sizes > 0).sum(1)
        if not bool((present > limit).any()):
            break
        ordered = torch.sort(torch.where(sizes > 0, sizes, sizes.new_full((), 1 << 62)), 1).values
        kth = ordered.gather(1, (present - limit - 1).clamp(min=0)[:, None])[:, 0]
        regions = merge_small_torch(regions, torch.where(present > limit, kth + 1, 0))
    return regions


def compact(regions: torch.Tensor) -> torch.Tensor:
    """Each slice's ids renumbered 0..n-1 in sorted order, +1 where the slice has no 0: `hierarchy_partition`'s
    numbering."""
    ids, stride = _global_ids(regions)
    b = regions.shape[0]
    uniq, inv = torch.unique(ids, return_inverse=True)
    start = torch.searchsorted(uniq, torch.arange(b, device=ids.device) * stride)
    has_zero = uniq[start.clamp(max=len(uniq) - 1)] % stride == 0
    return inv - start[:, None, None] + (~has_zero).long()[:, None, None]


def partition_from_units(units: torch.Tensor, prob: torch.Tensor, threshold: float, min_region: int,
                         emb: torch.Tensor | None = None, emb_weight: float = 0.0,
                         voters: Voters | None = None) -> torch.Tensor:
    """`hierarchy_partition` of the units' own merge order, before upsampling: units (B,H,W) and the maps
    they were flooded on -> ids (B,H,W) int64, 1..n per slice (0 where the units have none)."""
    merged = merge_below(units, prob, threshold, emb, emb_weight, voters)
    # 4-connected pieces (a basin is only 8-connected), numbered in raster order, as `components` numbers them
    regions = compact(label_components(merged, units > 0, connectivity=4))
    return compact(cap_torch(merge_small_torch(regions, min_cells(min_region, units.shape[-1])), MAX_ID))


def learned_partition_torch(boundary: torch.Tensor, threshold: float, min_region: int, out_size: int = 512,
                            emb: torch.Tensor | None = None, emb_weight: float = 0.0,
                            min_regions: int = 0, voters: Voters | None = None) -> torch.Tensor:
    """`fsct.partition.learned_partition` in batched torch ops on the maps' device: boundary probabilities
    (B,h,w) (+ embeddings (B,C,h',w')) -> partitions (B,out_size,out_size) uint8, ids 1..n per slice."""
    prob = _work(boundary.float()[:, None])[:, 0]
    units = flood_torch(basins_torch(prob), prob).long()
    vote = voters is not None and voters.weight > 0
    e = _work(emb.float()) if emb is not None and (emb_weight > 0 or vote) else None
    part = partition_from_units(units, prob, threshold, min_region, e, emb_weight, voters)
    # `fsct.partition.floored`: only the slices under the floor are cut again, one lower threshold at a time
    for t in ladder(threshold, min_regions)[1:]:
        low = torch.nonzero(part.flatten(1).amax(1) < min_regions)[:, 0]
        if len(low) == 0:
            break
        part[low] = partition_from_units(units[low], prob[low], t, min_region, None if e is None else e[low],
                                         emb_weight, voters)
    if out_size != WORK_SIZE:
        part = F.interpolate(part[:, None].float(), size=(out_size, out_size), mode="nearest")[:, 0]
    return part.to(torch.uint8)

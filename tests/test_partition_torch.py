"""The learned partition as batched torch ops (fsct/partition_torch.py) against the CPU path it replaces on a
GPU: same labels, same basins, the same merges as the greedy merge order, the same small-region clean-up."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage.measure import label

from fsct.config import PredictConfig
from fsct.partition import (
    Hierarchy,
    _cap,
    basins,
    components,
    flood,
    hierarchy_partition,
    learned_partition,
    merge_sequence,
    merge_small,
)
from fsct.partition_torch import (
    basins_torch,
    cap_torch,
    compact,
    label_components,
    merge_small_torch,
    partition_from_units,
)
from fsct.vote import Voters, pad_voters


def smooth_maps(b: int, size: int, seed: int, k: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.rand((b, 1, size, size), generator=g), k, 1, k // 2)[:, 0]


def blocky(b: int, size: int, values: int, seed: int) -> torch.Tensor:
    """Integer maps of blobs and specks: coarse noise upsampled, plus single-cell changes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, values, (b, 1, size // 4, size // 4), generator=g).float()
    maps = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
    specks = torch.rand((b, size, size), generator=g) < 0.03
    return torch.where(specks, torch.randint(0, values, (b, size, size), generator=g), maps)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_are_scikit_images_in_raster_order(connectivity: int):
    values = blocky(3, 40, 4, seed=connectivity)
    mask = blocky(3, 40, 5, seed=10 + connectivity) > 0
    mask[2] = True  # one slice without background
    got = compact(label_components(values, mask, connectivity)).numpy()
    for v, m, g in zip(values.numpy(), mask.numpy(), got, strict=True):
        ref = label(np.where(m, v + 1, 0), background=0, connectivity=connectivity // 4)
        assert ref.max() > 10  # a real test: many components, some touching only at corners
        np.testing.assert_array_equal(g, ref)


def test_torch_basins_are_the_cpu_basins():
    maps = smooth_maps(3, 48, seed=1)
    x = torch.linspace(0, 1, 48)
    maps[2] = (1 - (2 * x - 1).abs()).expand(48, 48) * 0.95  # two pits and a ridge: plateaus at every level
    ref = basins(maps)
    assert (ref.amax((1, 2)) > 1).all()
    assert torch.equal(basins_torch(maps), ref)


def reference_partitions(units: np.ndarray, prob: np.ndarray, emb: np.ndarray | None, w: float, t: float,
                         min_region: int, voters: Voters | None = None) -> np.ndarray:
    return np.stack([hierarchy_partition(Hierarchy(u, merge_sequence(u, p, None if emb is None else emb[i], w,
                                                                     voters)),
                                         t, min_region, out_size=u.shape[-1])
                     for i, (u, p) in enumerate(zip(units, prob, strict=True))])


def random_voters(channels: int, weight: float) -> Voters:
    """Three support slices of 2-5 structures each, random directions in the embedding space."""
    g = torch.Generator().manual_seed(9)
    return pad_voters([torch.randn((n, channels), generator=g, dtype=torch.float64) for n in (2, 5, 3)],
                      scale=20.0, weight=weight)


@pytest.mark.parametrize(("emb_weight", "vote"), [(0.0, 0.0), (0.6, 0.0), (0.6, 0.25), (0.0, 0.5)])
def test_torch_merges_are_the_greedy_merge_orders_cut(emb_weight: float, vote: float):
    """One batch of slices merged in tensor passes gives each slice exactly the partition its own greedy merge
    order gives when cut at the same threshold (small regions folded and ids numbered alike), with the
    embedding term and the support slices' vote too."""
    prob = smooth_maps(4, 64, seed=3, k=5)
    units = flood(basins(prob), prob).long()
    g = torch.Generator().manual_seed(4)
    use = emb_weight > 0 or vote > 0
    emb = torch.nn.functional.avg_pool2d(torch.randn((4, 8, 64, 64), generator=g), 9, 1, 4) if use else None
    voters = random_voters(8, vote) if vote else None
    heights = np.concatenate([merge_sequence(u, p, None if emb is None else emb[i].numpy(), emb_weight,
                                             voters)[:, 0]
                              for i, (u, p) in enumerate(zip(units.numpy(), prob.numpy(), strict=True))])
    for q in (0.2, 0.5, 0.8):  # thresholds inside the merge orders: some merges below, some above
        t = float(np.quantile(heights, q))
        got = partition_from_units(units, prob, t, min_region=1024, emb=emb, emb_weight=emb_weight,
                                   voters=voters).numpy()
        ref = reference_partitions(units.numpy(), prob.numpy(), None if emb is None else emb.numpy(), emb_weight,
                                   t, 1024, voters)
        assert 1 < len(np.unique(ref)) < int(units.max())
        np.testing.assert_array_equal(got, ref)


def test_small_regions_and_the_cap_fold_as_on_the_cpu():
    regions = torch.from_numpy(np.stack([components(m)[0] for m in blocky(3, 48, 6, seed=7).numpy()])).long()
    regions[0, :6, :6] = 0  # region 0 of one slice: a target, never merged itself
    for floor in (3, 20):
        ref = np.stack([merge_small(r, floor) for r in regions.numpy()])
        got = merge_small_torch(regions, floor).numpy()
        for r, g in zip(ref, got, strict=True):  # same pieces; ids may differ only by the batch's renumbering
            np.testing.assert_array_equal(compact(torch.from_numpy(g)[None])[0].numpy(),
                                          compact(torch.from_numpy(r)[None])[0].numpy())
    ref = np.stack([_cap(r, 12) for r in regions.numpy()])
    got = cap_torch(regions, 12)
    assert ((np.stack([len(np.unique(r[r > 0])) for r in got.numpy()])) <= 12).all()
    np.testing.assert_array_equal(compact(got).numpy(), compact(torch.from_numpy(ref)).numpy())


def test_partition_ops_torch_is_the_cpu_partition():
    """Through the config, as predict calls it: uint8 512x512 ids, identical to the CPU path's, on walls that
    meet (fronts tie there) and on noisy maps with the embedding term."""
    prob = torch.full((2, 64, 64), 0.05)
    prob[:, 30:33, :] = 0.95
    prob[:, :30, 40:42] = 0.9
    prob[1, 50:52, 5:7] = 0.0
    for t, n in ((0.5, 3), (0.97, 1)):
        cpu = learned_partition(prob, PredictConfig(boundary_threshold=t, min_region=64, partition_ops="numpy"))
        dev = learned_partition(prob, PredictConfig(boundary_threshold=t, min_region=64, partition_ops="torch"))
        assert dev.dtype == np.uint8 and dev.shape == (2, 512, 512)
        assert [len(np.unique(p)) for p in dev] == [n, n]
        np.testing.assert_array_equal(dev, cpu)
    prob = smooth_maps(3, 64, seed=5, k=5)
    emb = torch.nn.functional.avg_pool2d(torch.randn((3, 8, 64, 64), generator=torch.Generator().manual_seed(6)),
                                         9, 1, 4)
    cfg = PredictConfig(boundary_threshold=0.45, min_region=64, embedding_weight=0.6)
    cpu = learned_partition(prob, replace(cfg, partition_ops="numpy"), 512, emb)
    dev = learned_partition(prob, replace(cfg, partition_ops="torch"), 512, emb)
    assert all(len(np.unique(p)) > 3 for p in cpu)
    np.testing.assert_array_equal(dev, cpu)
    # a region floor some slices are under: only those are cut again, down the grid, on both paths
    floor = int(np.median([p.max() for p in cpu])) + 1
    cpu_floor = learned_partition(prob, replace(cfg, partition_ops="numpy", min_regions=floor), 512, emb)
    dev_floor = learned_partition(prob, replace(cfg, partition_ops="torch", min_regions=floor), 512, emb)
    assert all(p.max() >= floor for p in cpu_floor) and not np.array_equal(cpu_floor, cpu)
    np.testing.assert_array_equal(dev_floor, cpu_floor)
    # white noise: over a thousand basins a slice, no merges, so the 255-region cap decides
    prob = torch.rand((2, 96, 96), generator=torch.Generator().manual_seed(0))
    cfg = PredictConfig(boundary_threshold=0.0, min_region=1)
    cpu = learned_partition(prob, replace(cfg, partition_ops="numpy"))
    dev = learned_partition(prob, replace(cfg, partition_ops="torch"))
    assert [len(np.unique(p)) for p in cpu] == [255, 254]
    np.testing.assert_array_equal(dev, cpu)

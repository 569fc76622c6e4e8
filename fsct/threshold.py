"""The boundary threshold of a dense model, chosen on val: the learned partition's official score on whole
val slices for a grid of thresholds. A model's boundary probabilities are calibrated by its training (their
spread narrows or widens with steps, data and loss weight), so one fixed number does not fit every run;
choosing it on the run's own val slices does, and the choice travels in the model's config.yaml."""

from __future__ import annotations

import functools

import numpy as np
import torch

from fsct.body_scale import Frames, unframed
from fsct.config import PredictConfig
from fsct.metrics import official_score_slice
from fsct.vote import Voters

# 0.05 .. 0.7 by 0.025. With the embedding term, `learned` peaks near 0.15-0.3; with the border alone, near
# 0.3-0.5. Past its best threshold the partition's score falls off a cliff within ~0.05 (two large structures
# merge; docs/RESULTS.md), so a coarser grid can miss the peak. The learned partition's grid costs one
# agglomeration per slice (each threshold cuts a prefix of its merges).
GRID = tuple(round(0.05 + 0.025 * i, 3) for i in range(27))


def ladder(threshold: float, min_regions: int) -> tuple[float, ...]:
    """The thresholds a slice is cut at in turn under a region floor (`fsct.partition.floored`): the threshold,
    then every lower one of the grid, highest first; the threshold alone without a floor."""
    if min_regions <= 0:
        return (threshold,)
    return (threshold, *(t for t in reversed(GRID) if t < threshold))


def threshold_scores(prob: torch.Tensor, images: np.ndarray, truths: np.ndarray, cfg: PredictConfig,
                     thresholds: tuple[float, ...], emb: torch.Tensor | None = None,
                     frames: Frames | None = None, voters: Voters | None = None) -> np.ndarray:
    """Boundary probabilities (N,h,w), uint8 slices and true label maps (N,H,W) (+ the embeddings (N,C,h,w)
    `learned` merges by when cfg.embedding_weight > 0) -> official scores (T, N) of the configured partition
    (`learned` or `boundary`) at each threshold, at the truth's size. With `frames` (fsct.predict.framed_maps),
    the maps and `images` are the slices seen through their body-scale windows, and each partition is mapped
    back to the truth's pixels before it is scored. `voters` (fsct/vote.py): the support slices' vote in
    `learned`'s merge cost (cfg.support_vote)."""
    from fsct.partition import boundary_hierarchy, floored, hierarchy_partition, learned_hierarchies

    size = truths.shape[-1]
    # One agglomeration per slice serves every threshold (each is a prefix of its merges).
    if cfg.partition_split == "learned":
        hier = learned_hierarchies(prob, emb, cfg.embedding_weight, voters)
    else:
        full = torch.nn.functional.interpolate(prob.float()[:, None], size=(size, size), mode="bilinear",
                                               align_corners=False)[:, 0].cpu().numpy()
        hier = [boundary_hierarchy(im, p, cfg) for im, p in zip(images, full, strict=True)]
    scores = np.zeros((len(thresholds), len(images)))
    for j, (tr, h) in enumerate(zip(truths, hier, strict=True)):
        # under a floor, threshold t may fall back to lower ones of the grid: each is cut once per slice
        cut_at = functools.cache(functools.partial(hierarchy_partition, h, min_region=cfg.min_region, out_size=size))
        one = None if frames is None else frames.select(j)
        scores[:, j] = [official_score_slice(tr, unframed(floored(cut_at, t, cfg.min_regions), one))
                        for t in thresholds]
    return scores


def region_floor(index: dict, split: str, min_region: int) -> int:
    """The median number of structures (labels of >= `min_region` pixels) of a slice of a shard set's labelled
    split, from its index.json (0 where the split has no labelled slice): `predict.min_regions` for a model
    trained on it. The challenge's slices carry about 18 structures; realct-mini's 15-29."""
    from fsct.data.episodes import usable_ways

    samples = index["splits"].get(split, {}).get("samples", {}).values()
    counts = [len(usable_ways(s["classes"], min_region)) for s in samples if s["classes"]]
    return int(np.median(counts)) if counts else 0

"""The boundary threshold of a dense model, chosen on val: the learned partition's official score on whole
val slices for a grid of thresholds. A model's boundary probabilities are calibrated by its training (their
spread narrows or widens with steps, data and loss weight), so one fixed number does not fit every run;
choosing it on the run's own val slices does, and the choice travels in the model's config.yaml."""

from __future__ import annotations

import numpy as np
import torch

from fsct.config import PredictConfig
from fsct.metrics import official_score_slice

# 0.05 .. 0.7 by 0.025. With the embedding term, `learned` peaks near 0.15-0.3; with the border alone, near
# 0.3-0.5. Past its best threshold the partition's score falls off a cliff within ~0.05 (two large structures
# merge; docs/RESULTS.md), so a coarser grid can miss the peak. The learned partition's grid costs one
# agglomeration per slice (each threshold cuts a prefix of its merges).
GRID = tuple(round(0.05 + 0.025 * i, 3) for i in range(27))


def threshold_scores(prob: torch.Tensor, images: np.ndarray, truths: np.ndarray, cfg: PredictConfig,
                     thresholds: tuple[float, ...], emb: torch.Tensor | None = None) -> np.ndarray:
    """Boundary probabilities (N,h,w), uint8 slices and true label maps (N,H,W) (+ the embeddings (N,C,h,w)
    `learned` merges by when cfg.embedding_weight > 0) -> official scores (T, N) of the configured partition
    (`learned` or `boundary`) at each threshold, at the truth's size."""
    from fsct.partition import boundary_hierarchy, hierarchy_partition, learned_hierarchies

    size = truths.shape[-1]
    # One agglomeration per slice serves every threshold (each is a prefix of its merges).
    if cfg.partition_split == "learned":
        hier = learned_hierarchies(prob, emb, cfg.embedding_weight)
    else:
        full = torch.nn.functional.interpolate(prob.float()[:, None], size=(size, size), mode="bilinear",
                                               align_corners=False)[:, 0].cpu().numpy()
        hier = [boundary_hierarchy(im, p, cfg) for im, p in zip(images, full, strict=True)]
    scores = np.zeros((len(thresholds), len(images)))
    for i, t in enumerate(thresholds):
        scores[i] = [official_score_slice(tr, hierarchy_partition(h, t, cfg.min_region, size))
                     for tr, h in zip(truths, hier, strict=True)]
    return scores

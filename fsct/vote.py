"""The support slices' vote on the learned partition's merges (`predict.support_vote`).

PANet's own question, asked of regions instead of pixels. Every labelled structure of a support slice gets a
prototype, the masked average of the model's embeddings over it. A region's mean embedding is scored against
one support slice's prototypes by cosine x the model's scale, softmax within that slice (label ids mean
nothing across slices). Two regions agree in a slice as much as they land on the same structure there:

    agree(x, y) = mean over support slices j of  sum_s p_j(s | x) p_j(s | y)

and the merge cost of `fsct.partition.merge_sequence` becomes (1 - w) x its border-and-embedding cost +
w x (1 - agree). The embedding term alone weighs how far apart two regions are; the vote asks whether slices a
radiologist drew put a border between them. On realct-mini's block split it lifted the kidney-level block
by 0.07 (mean of 8 checkpoints) and left the upper-abdomen block level (docs/RESULTS.md, "The support slices
vote on the merge")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsct.config import PredictConfig
from fsct.data.pool import load_split, read_index
from fsct.errors import FsctError


@dataclass
class Voters:
    """The support slices' structure prototypes, padded to a block (J slices x S structures)."""

    protos: torch.Tensor  # (J, S, C) float64, unit norm; padding rows are zero
    valid: torch.Tensor  # (J, S) bool
    scale: float  # the model's cosine scale: the sharpness its prototype loss trained
    weight: float  # w of the merge cost

    def probs(self, vec: torch.Tensor) -> torch.Tensor:
        """Summed (or mean) region embeddings (N, C) -> each support slice's softmax over its structures
        (N, J, S), float64."""
        e = vec.double()
        e = e / (e.norm(dim=1, keepdim=True) + 1e-12)
        logits = self.scale * torch.einsum("nc,jsc->njs", e, self.protos.to(e.device))
        return logits.masked_fill(~self.valid.to(e.device), float("-inf")).softmax(-1)

    def to(self, device: torch.device | str) -> Voters:
        return Voters(self.protos.to(device), self.valid.to(device), self.scale, self.weight)


def vote_on(cfg: PredictConfig) -> bool:
    """Whether the `learned` partition's merges take the support slices' vote."""
    return cfg.partition_split == "learned" and cfg.support_vote > 0


def agreement(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Two stacks of `Voters.probs` (N, J, S) -> agree (N,): how often, in expectation, a support slice calls
    both regions the same structure."""
    return (pa * pb).sum((1, 2)) / pa.shape[1]


def voter_keys(shards: Path, split: str, limit: int) -> list[str]:
    """Up to `limit` labelled slices of a shard split, evenly spread over its key order (a body's levels)."""
    samples = read_index(shards)["splits"].get(split, {}).get("samples", {})
    keys = [k for k, s in samples.items() if len(s.get("classes") or {}) >= 2]
    if not keys:
        raise FsctError(f"{shards}: split '{split}' has no slice with two labelled structures to vote "
                        "(predict.support_vote needs labelled support slices)")
    keys = sorted(keys)
    pick = np.unique(np.linspace(0, len(keys) - 1, min(limit, len(keys))).round().astype(int))
    return [keys[i] for i in pick]


def load_voter_slices(shards: Path, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and label maps (J, H, W), at their own size, of the slices `voter_keys` picks."""
    pool = load_split(shards, split, keys=set(voter_keys(shards, split, limit)))
    if pool.masks is None:
        raise FsctError(f"{shards}: split '{split}' has slices without masks; the vote needs labelled ones")
    return pool.images, pool.masks


def prototypes_from_maps(emb: torch.Tensor, masks: torch.Tensor, min_cells: int) -> list[torch.Tensor]:
    """Embeddings (J, C, h, w) and label maps (J, h, w) at the same size -> per slice, the unit-norm mean
    embedding (S_j, C) of each label (> 0) covering at least `min_cells` cells (float64)."""
    out = []
    for e, m in zip(emb.double(), masks.long(), strict=True):
        ids, counts = torch.unique(m[m > 0], return_counts=True)
        ids = ids[counts >= min_cells]
        p = torch.stack([e[:, m == i].mean(1) for i in ids.tolist()]) if len(ids) else e.new_zeros(0, e.shape[0])
        out.append(p / (p.norm(dim=1, keepdim=True) + 1e-12))
    return out


def pad_voters(protos: list[torch.Tensor], scale: float, weight: float) -> Voters:
    """Per-slice prototype stacks -> `Voters`; slices with fewer than two structures cannot vote and are left
    out."""
    protos = [p for p in protos if len(p) >= 2]
    if not protos:
        raise FsctError("no support slice has two labelled structures large enough to vote")
    j, s, c = len(protos), max(len(p) for p in protos), protos[0].shape[1]
    block = protos[0].new_zeros(j, s, c)
    valid = torch.zeros(j, s, dtype=torch.bool, device=block.device)
    for i, p in enumerate(protos):
        block[i, : len(p)] = p
        valid[i, : len(p)] = True
    return Voters(block, valid, scale, weight)


@torch.no_grad()
def support_voters(model: torch.nn.Module, images: np.ndarray, masks: np.ndarray, cfg: PredictConfig,
                   image_size: int, batch: int = 8) -> Voters:
    """The model's `Voters` from labelled support slices (uint8 images and label maps, (J, H, W)), on the
    model's device. The support slices are training slices, so they are seen as they are (no body-scale
    window); embeddings and labels meet at the partition's working size."""
    from fsct.partition import WORK_SIZE, _work, min_cells
    from fsct.predict import dense_maps

    dev = next(model.parameters()).device
    protos = []
    for i in range(0, len(images), batch):
        _, emb = dense_maps(model, torch.from_numpy(images[i:i + batch]).to(dev), cfg.tta_flip, image_size)
        m = F.interpolate(torch.from_numpy(masks[i:i + batch]).to(dev)[:, None].float(),
                          size=(WORK_SIZE, WORK_SIZE), mode="nearest")[:, 0]
        protos += prototypes_from_maps(_work(emb.float()), m, min_cells(cfg.min_region, WORK_SIZE))
    return pad_voters(protos, float(getattr(model, "scale", 1.0)), cfg.support_vote)


def shard_voters(model: torch.nn.Module, shards: Path, split: str, cfg: PredictConfig, image_size: int) -> Voters:
    """`support_voters` of the slices of a shard split that `voter_keys` picks (what `fsct predict --support`
    votes with)."""
    return support_voters(model, *load_voter_slices(shards, split, cfg.vote_slices), cfg, image_size)

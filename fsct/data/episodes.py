"""Episodes: which slices and which label ids make one N-way K-shot task, and the tensors it becomes.

Drawing is pure index work on the in-memory pool, deterministic from (seed, rank, step, e): a run resumed
at step s draws exactly what an uninterrupted run would have (data.loader: stream runs the same draws over
its buffer's slots, fsct.data.stream). Modes plug in as functions in `DRAW`:
  class       the notebook's: a label id is a class across slices; K+Q distinct slices per way
  slice       the ways are the structures of ONE labelled slice; support and query are augmented views
  superpixel  as slice, on superpixel pseudo-labels of (unlabelled) slices, after SSL-ALPNet
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fsct.config import AugmentConfig, Config, EpisodeConfig
from fsct.data.augment import augment_batch
from fsct.data.pool import Pool, load_split, normalise, rank_subset, to_unit
from fsct.errors import FsctError


@dataclass(frozen=True)
class Episode:
    support: np.ndarray  # pool indices, (n_way * k_shot,) for class episodes, (k_shot,) for views
    query: np.ndarray
    ways: np.ndarray  # label ids; way i becomes label i + 1, everything else background
    source: str = "mask"  # mask | superpixel: which label map the ids refer to
    mode: str = "class"


@dataclass
class Batch:
    s_img: torch.Tensor  # (E, S, 1, H, W) float, normalised to [-1, 1] like the notebook
    s_lbl: torch.Tensor  # (E, S, H, W) long in 0..n_way
    q_img: torch.Tensor  # (E, Q, 1, H, W)
    q_lbl: torch.Tensor  # (E, Q, H, W)
    n_way: int
    raw: torch.Tensor | None = None  # (E, S+Q, H, W) long: the slices' own label ids (mask episodes only)

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(move(t) for t in (self.s_img, self.s_lbl, self.q_img, self.q_lbl)), self.n_way,
                     move(self.raw))


def rng_for(seed: int, rank: int, step: int, e: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, step, e])  # e < 2**30; the mode draw uses 2**30


def usable_ways(classes: dict[str, int], min_pixels: int) -> list[int]:
    return [int(c) for c, n in classes.items() if n >= min_pixels]


def superpixel_ways(sp: np.ndarray, min_pixels: int) -> list[int]:
    """The superpixel ids of one map (at any size) big enough to be a way: counts are scaled to full-size
    pixels, so min_pixels means the same at every training size."""
    scale = (512 / sp.shape[-1]) ** 2
    counts = np.bincount(sp.ravel(), minlength=256) * scale
    return [int(c) for c in np.flatnonzero(counts >= min_pixels) if c != 0]


def mode_weights(cfg: EpisodeConfig) -> tuple[list[str], np.ndarray]:
    """The episode kinds drawn (DRAW's keys: a Literal checked when the config loads) and their odds."""
    mix = cfg.effective_mix
    modes = sorted(mix)
    w = np.array([mix[m] for m in modes], dtype=np.float64)
    return modes, w / w.sum()


def mode_at(seed: int, rank: int, step: int, modes: list[str], weights: np.ndarray) -> str:
    # one mode per step, so the episodes of a step stack into one batch of equal shapes
    return str(np.random.default_rng([seed, rank, step, 1 << 30]).choice(modes, p=weights))


class ClassIndex:
    """label id -> pool slices where it is visible, restricted to ids with enough slices for an episode."""

    def __init__(self, pool: Pool, cfg: EpisodeConfig, allowed: set[int] | None = None):
        need = cfg.k_shot + cfg.n_query
        by_class: dict[int, list[int]] = {}
        for i, classes in enumerate(pool.classes):
            for c in usable_ways(classes, cfg.min_pixels):
                if allowed is None or c in allowed:
                    by_class.setdefault(c, []).append(i)
        self.slices = {c: np.array(v) for c, v in sorted(by_class.items()) if len(v) >= need}
        self.ids = np.array(sorted(self.slices), dtype=np.int64)


def draw_class(pool: Pool, index: ClassIndex, cfg: EpisodeConfig, rng: np.random.Generator) -> Episode:
    """n_way ids, then per way K support and Q query slices showing it. No slice is both support and
    query; a slice may serve several ways on the same side (its mask labels all of them anyway)."""
    if len(index.ids) < cfg.n_way:
        raise FsctError(f"class episodes need {cfg.n_way} label ids with >= {cfg.k_shot + cfg.n_query} slices "
                        f"each; this pool has {len(index.ids)} (use fewer ways/shots, or episodes.mode: slice)")
    for _ in range(100):
        ways = rng.choice(index.ids, cfg.n_way, replace=False)
        support: list[int] = []
        query: list[int] = []
        for c in ways:
            cand = index.slices[int(c)]
            s_cand = np.setdiff1d(cand, np.array(query, dtype=np.int64))
            if len(s_cand) < cfg.k_shot:
                break
            s_pick = rng.choice(s_cand, cfg.k_shot, replace=False)
            q_cand = np.setdiff1d(cand, np.array(support + s_pick.tolist(), dtype=np.int64))
            if len(q_cand) < cfg.n_query:
                break
            support += s_pick.tolist()
            query += rng.choice(q_cand, cfg.n_query, replace=False).tolist()
        else:
            return Episode(np.array(support), np.array(query), ways, "mask", "class")
    raise FsctError("could not draw a class episode with disjoint support and query in 100 tries")


def _draw_views(candidates: np.ndarray, label_sets: list[list[int]], cfg: EpisodeConfig,
                rng: np.random.Generator, source: str, mode: str) -> Episode:
    i = int(rng.choice(candidates))
    ways = rng.choice(np.array(label_sets[i]), cfg.n_way, replace=False)
    return Episode(np.full(cfg.k_shot, i), np.full(cfg.n_query, i), ways, source, mode)


class EpisodeSampler:
    """Episodes for one rank, by step. Holds only indices; tensors come from `make_batch`."""

    def __init__(self, pool: Pool, cfg: EpisodeConfig, seed: int, rank: int = 0,
                 allowed_classes: set[int] | None = None, superpixel_pool: Pool | None = None):
        self.pool, self.cfg, self.seed, self.rank = pool, cfg, seed, rank
        self.mix = cfg.effective_mix
        self.modes, self.weights = mode_weights(cfg)
        self.class_index = ClassIndex(pool, cfg, allowed_classes) if "class" in self.mix else None
        if "slice" in self.mix:
            self.slice_ways = [usable_ways(c, cfg.min_pixels) for c in pool.classes]
            self.slice_candidates = np.array([i for i, w in enumerate(self.slice_ways) if len(w) >= cfg.n_way])
            if len(self.slice_candidates) == 0:
                raise FsctError(f"slice episodes need slices with >= {cfg.n_way} structures; none in pool")
        self.sp_pool = superpixel_pool
        if "superpixel" in self.mix:
            if superpixel_pool is None or superpixel_pool.superpixels is None:
                raise FsctError("superpixel episodes need shards written with `fsct shard --superpixels`")
            self.sp_ways = [superpixel_ways(s, cfg.min_pixels) for s in superpixel_pool.superpixels]
            self.sp_candidates = np.array([i for i, w in enumerate(self.sp_ways) if len(w) >= cfg.n_way])
            if len(self.sp_candidates) == 0:
                raise FsctError(f"superpixel episodes need slices with >= {cfg.n_way} superpixels; none found")

    def mode_at(self, step: int) -> str:
        return mode_at(self.seed, self.rank, step, self.modes, self.weights)

    def episode(self, step: int, e: int = 0) -> Episode:
        return DRAW[self.mode_at(step)](self, rng_for(self.seed, self.rank, step, e))

    def step(self, step: int) -> list[Episode]:
        return [self.episode(step, e) for e in range(self.cfg.episodes_per_step)]


DRAW: dict[str, Callable[[EpisodeSampler, np.random.Generator], Episode]] = {
    "class": lambda s, rng: draw_class(s.pool, s.class_index, s.cfg, rng),
    "slice": lambda s, rng: _draw_views(s.slice_candidates, s.slice_ways, s.cfg, rng, "mask", "slice"),
    "superpixel": lambda s, rng: _draw_views(s.sp_candidates, s.sp_ways, s.cfg, rng, "superpixel",
                                             "superpixel"),
}


@dataclass
class PoolTensors:
    """The pool as tensors, on the training device when it fits (the whole train set is ~130 MB)."""

    images: torch.Tensor  # (N, H, W) uint8
    masks: torch.Tensor | None
    superpixels: torch.Tensor | None

    @classmethod
    def from_pool(cls, pool: Pool, device: torch.device | str = "cpu") -> PoolTensors:
        def t(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(t(pool.images), t(pool.masks), t(pool.superpixels))


def make_batch(episodes: list[Episode], pool: PoolTensors, n_way: int, augment: AugmentConfig | None,
               generator: torch.Generator | None, sp_pool: PoolTensors | None = None) -> Batch:
    """Gather, remap labels to 0..n_way, and (optionally) augment every slice of the episodes."""
    device = pool.images.device
    E = len(episodes)
    lut = torch.zeros(E, 256, dtype=torch.long)
    for e, ep in enumerate(episodes):
        lut[e, torch.as_tensor(ep.ways, dtype=torch.long)] = torch.arange(1, n_way + 1)
    lut = lut.to(device)

    def gather(field: str) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, lbls = [], []
        for ep in episodes:
            src = sp_pool if ep.source == "superpixel" else pool
            idx = torch.as_tensor(getattr(ep, field), device=device)
            imgs.append(src.images.index_select(0, idx))
            maps = src.superpixels if ep.source == "superpixel" else src.masks
            lbls.append(maps.index_select(0, idx))
        return torch.stack(imgs), torch.stack(lbls).long()

    s_img, s_raw = gather("support")
    q_img, q_raw = gather("query")
    S = s_img.shape[1]
    img = to_unit(torch.cat([s_img, q_img], 1))
    raw = torch.cat([s_raw, q_raw], 1)
    if augment is not None and augment.enabled:
        # Labels are sampled nearest, so remapping after the warp equals warping the remapped labels.
        flat_img, flat_raw = augment_batch(img.flatten(0, 1), raw.flatten(0, 1), augment, generator)
        img, raw = flat_img.view_as(img), flat_raw.view_as(raw)
    lbl = torch.gather(lut, 1, raw.flatten(1)).view_as(raw)  # per-episode remap via a 256-entry table
    img = normalise(img).unsqueeze(2)
    # Superpixel ids are pseudo-labels: their borders are intensity edges, not what the boundary head learns.
    mask_source = all(ep.source == "mask" for ep in episodes)
    return Batch(img[:, :S].contiguous(), lbl[:, :S].contiguous(), img[:, S:].contiguous(),
                 lbl[:, S:].contiguous(), n_way, raw if mask_source else None)


def step_generator(seed: int, rank: int, step: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 10_007 + step) % (2**63))
    return g


class EpisodeStream(IterableDataset):
    """(step, Batch) for steps start..stop, built on the CPU in DataLoader workers.

    Worker w builds steps start + w, start + w + n, ...; the DataLoader takes one item from each worker
    in turn, so the stream comes out in step order with no episode built twice."""

    def __init__(self, sampler: EpisodeSampler, pool: Pool, augment: AugmentConfig, start: int, stop: int,
                 sp_pool: Pool | None = None):
        self.sampler, self.pool, self.augment, self.start, self.stop = sampler, pool, augment, start, stop
        self.sp_pool = sp_pool

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        tensors = PoolTensors.from_pool(self.pool)
        sp = PoolTensors.from_pool(self.sp_pool) if self.sp_pool is not None else None
        for step in range(self.start + wid, self.stop, n):
            eps = self.sampler.step(step)
            gen = step_generator(self.sampler.seed, self.sampler.rank, step, "cpu")
            yield step, make_batch(eps, tensors, self.sampler.cfg.n_way, self.augment, gen, sp)


class TrainSource(Protocol):
    """One rank's training data, in memory (TrainData) or streamed (fsct.data.stream.StreamData): what the
    trainer and `fsct bench train` ask of it."""

    loader: str
    shard_names: list[str]  # the train shards this rank reads
    share_keys: list[str]  # the train slices this rank trains on (its share of the split)

    def restore(self, ckpt: Path | None, rank: int) -> None:
        """Continue from a training checkpoint (what `save` wrote there), or start afresh (None)."""

    def save(self, ckpt: Path, rank: int) -> None:
        """Write what `restore` needs into a checkpoint folder being written."""

    def batches(self, cfg: Config, start: int, dev: torch.device) -> Iterator[tuple[list[list[str]], Batch]]:
        """Per micro-step from start * grad_accum on: each episode's slice keys and the batch on `dev`."""


@dataclass
class TrainData:
    """One rank's training data (data.loader: memory): its share of the train split (and of the unlabelled
    split when superpixel episodes are drawn) decoded in memory, and the sampler that draws its episodes
    from them. Episodes are indices drawn from (seed, rank, step): a checkpoint needs nothing from it."""

    pool: Pool
    sp_pool: Pool | None
    sampler: EpisodeSampler
    shard_names: list[str] = field(default_factory=list)
    loader: str = "memory"

    @property
    def share_keys(self) -> list[str]:
        return self.pool.keys

    def keys(self, ep: Episode) -> list[str]:
        """The slice keys of an episode, support then query (what the episode audit records)."""
        keys = (self.sp_pool if ep.source == "superpixel" else self.pool).keys
        return [keys[i] for i in (*ep.support, *ep.query)]

    def restore(self, ckpt: Path | None, rank: int) -> None:
        pass

    def save(self, ckpt: Path, rank: int) -> None:
        pass

    def batches(self, cfg: Config, start: int, dev: torch.device) -> Iterator[tuple[list[list[str]], Batch]]:
        for episodes, batch in episode_batches(cfg, self.sampler, self.pool, self.sp_pool, start, dev):
            yield [self.keys(ep) for ep in episodes], batch


def load_train_data(cfg: Config, rank: int, world: int) -> TrainSource:
    """This rank's training data, as `data.loader` says: decoded in memory, or streamed from its shards."""
    if cfg.data.loader == "stream":
        from fsct.data.stream import StreamData

        return StreamData(cfg, rank, world)
    shards = Path(cfg.data.shards)
    names, keys = rank_subset(shards, cfg.data.train_split, rank, world)
    pool = load_split(shards, cfg.data.train_split, names, cfg.data.image_size, keys)
    sp_pool = superpixel_pool(cfg, shards, rank, world) if "superpixel" in cfg.episodes.effective_mix else None
    return TrainData(pool, sp_pool, EpisodeSampler(pool, cfg.episodes, cfg.train.seed, rank, superpixel_pool=sp_pool),
                     names)


def superpixel_pool(cfg: Config, shards: Path, rank: int, world: int) -> Pool:
    """This rank's share of the unlabelled split, whose superpixel maps feed superpixel episodes."""
    split = cfg.data.unlabeled_split
    names, keys = rank_subset(shards, split, rank, world)
    return load_split(shards, split, names, cfg.data.image_size, keys)


def episode_batches(cfg: Config, sampler: EpisodeSampler, pool: Pool, sp_pool: Pool | None, start: int,
                    dev: torch.device) -> Iterator[tuple[list[Episode], Batch]]:
    """(episodes, batch) for micro-steps from start * grad_accum on, batch on `dev`: built on the device
    from a device-side pool (the fast path), or on the CPU by DataLoader workers."""
    first, stop = start * cfg.optim.grad_accum, cfg.train.max_steps * cfg.optim.grad_accum
    if cfg.data.num_workers > 0:
        stream = EpisodeStream(sampler, pool, cfg.augment, first, stop, sp_pool)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                                             pin_memory=dev.type == "cuda", persistent_workers=False)
        for step, batch in loader:
            yield sampler.step(step), batch.to(dev)
        return
    where = dev if cfg.data.cache_on_device else torch.device("cpu")
    tensors = PoolTensors.from_pool(pool, where)
    sp = PoolTensors.from_pool(sp_pool, where) if sp_pool is not None else None
    for micro in range(first, stop):
        gen = step_generator(sampler.seed, sampler.rank, micro, where)
        episodes = sampler.step(micro)
        yield episodes, make_batch(episodes, tensors, cfg.episodes.n_way, cfg.augment, gen, sp).to(dev)

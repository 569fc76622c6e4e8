"""`data.loader: stream`: episodes drawn from a bounded buffer that each rank fills from its own shards, read
and decoded in DataLoader workers. Memory per rank is the buffer (`data.buffer_slices` slices at
`data.image_size`), not the data set; the memory loader (fsct.data.episodes.TrainData) stays the default.

The stream of a split on one rank
  Its tars are the rank's share (`share`: shards[rank::world], or every world-th key when there are fewer
  tars than ranks), split again over max(1, data.num_workers) readers the same way: webdataset's
  split_by_node then split_by_worker, as explicit lists, never through `accelerator.prepare`. A reader goes
  through its tars epoch after epoch, each epoch's tar order drawn from (seed, rank, reader, split, epoch):
  endless, so every rank runs exactly max_steps steps whatever its number of tars. A reader hands over
  CHUNK slices at a time and the DataLoader takes one chunk from each worker in turn, so slices reach the
  trainer in one order, fixed by (seed, rank, world, data.num_workers).

The buffer
  Slots on the training device, indexed by label id (class episodes) and by the ways of each slot (slice
  and superpixel episodes). Episodes are drawn from it by the memory loader's own draw functions with its
  rng (seed, rank, step, e). A slot is refilled from the stream once `data.slice_uses` steps have drawn
  it (webdataset's shuffle buffer with a slice used that many times: decoding costs 1/slice_uses of a
  decode per slice trained on), so every slice that enters is trained on, except one whose label ids stay
  too rare in the buffer for a class episode: a clock hand passes over the slots and replaces such a slot
  once `buffer_slices` slices went by since it entered. Slices no episode of the mix can use (too few
  structures) never enter.

Resume
  A checkpoint keeps, per rank and buffer, the stream position (slices taken), the clock hand and each
  slot's key, age and uses left: a few KB. `restore` reads those slices back from their tars and restarts each reader
  at its place (an arithmetic seek in index.json's per-tar counts), so a resumed run draws exactly the
  episodes of an uninterrupted one. Replaying the stream from step 0 would cost decoding every slice
  consumed so far instead (measured in docs/SCALING.md).
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fsct.config import Config, EpisodeConfig
from fsct.data.episodes import (
    DRAW,
    Batch,
    Episode,
    PoolTensors,
    make_batch,
    mode_at,
    mode_weights,
    rng_for,
    step_generator,
    superpixel_ways,
    usable_ways,
)
from fsct.data.pool import (
    checked_shard,
    index_subset,
    key_order,
    read_index,
    sample_arrays,
    share,
    split_info,
)
from fsct.errors import FsctError

CHUNK = 16  # slices per DataLoader item: few messages between processes, and still finer than a tar
STATE = "stream_rank{rank}.json"
STATE_VERSION = 1


# --- readers: which slices of a split one worker of one rank reads, in which order -----------------------

@dataclass(frozen=True)
class Reader:
    """One reader's share of a split: its tars, and the keys it takes from each, in file order."""

    names: list[str]
    keys: dict[str, list[str]]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.keys.values())


def split_readers(folder: Path, info: dict, split: str, rank: int, world: int, workers: int) -> list[Reader]:
    """The rank's share of a split over `workers` readers: tars[w::workers], or with fewer tars than readers
    all of the rank's tars and every workers-th of its keys. No reader is left without slices."""
    names, keys = share(info, rank, world)
    by_shard: dict[str, list[str]] = {n: [] for n in names}
    for k, v in info["samples"].items():  # one pass, in file order (shard_keys per tar would be one each)
        if v["shard"] in by_shard:
            by_shard[v["shard"]].append(k)
    if keys is None and len(names) >= workers:
        shares: list[tuple[list[str], set[str] | None]] = [(names[w::workers], None) for w in range(workers)]
    else:
        own = sorted(keys if keys is not None else [k for n in names for k in by_shard[n]], key=key_order)
        shares = [(names, set(own[w::workers])) for w in range(workers)]
    readers = []
    for names_w, keys_w in shares:
        kept = {n: [k for k in by_shard[n] if keys_w is None or k in keys_w] for n in names_w}
        kept = {n: ks for n, ks in kept.items() if ks}
        if not kept:
            raise FsctError(f"{folder}: split '{split}' has {info['n_samples']} slices, too few for {world} rank(s) "
                            f"x {workers} reader(s) (data.num_workers): use fewer workers or data.loader=memory")
        readers.append(Reader(list(kept), kept))
    return readers


def epoch_order(seed: int, rank: int, reader: int, split: str, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, rank, reader, zlib.crc32(split.encode()), epoch]).permutation(n)


@dataclass
class StreamSpec:
    """What a worker needs to read one split for one rank (fork shares it; nothing here is per process)."""

    folder: Path
    index: dict
    split: str
    readers: list[Reader]
    seed: int
    rank: int
    size: int  # data.image_size
    field: str  # the label map the episodes use: mask.png (train) or sp.png (unlabelled)
    min_pixels: int

    @property
    def skip(self) -> frozenset[str]:
        """The other label map: not decoded."""
        return frozenset({"mask.png", "sp.png"} - {self.field})

    @property
    def n_slices(self) -> int:
        return sum(r.size for r in self.readers)

    @property
    def chunk(self) -> int:
        """Slices per DataLoader item: CHUNK, or fewer when a reader holds fewer (a chunk then never repeats
        a slice, and small data sets still interleave their readers)."""
        return min(CHUNK, *(r.size for r in self.readers))

    @property
    def round(self) -> int:
        """Slices taken from the interleaved stream within which every slice of every reader comes once."""
        return len(self.readers) * max(r.size for r in self.readers)


def slice_record(spec: StreamSpec, name: str, s: dict) -> tuple[str, np.ndarray, np.ndarray, list[int]]:
    """(key, image, label map, usable ways) of one decoded sample, at the training size."""
    img, mask, sp = sample_arrays(s, spec.size)
    label = mask if spec.field == "mask.png" else sp
    if label is None:
        hint = "`fsct shard --superpixels` writes them" if spec.field == "sp.png" else "the train split needs masks"
        raise FsctError(f"{spec.folder / name}: sample '{s['__key__']}' has no {spec.field} ({hint})")
    ways = (usable_ways(s["meta.json"]["classes"], spec.min_pixels) if spec.field == "mask.png"
            else superpixel_ways(label, spec.min_pixels))
    return s["__key__"], img, label, ways


def read_slices(spec: StreamSpec, r: int, start: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, list[int]]]:
    """Reader r's endless stream from its `start`-th slice on: epochs of its tars in a seeded order."""
    reader = spec.readers[r]
    epoch, skip = divmod(start, reader.size)
    hashed: set[str] = set()  # a tar is checked against its sha256 once per process, then by size and keys
    while True:
        for i in epoch_order(spec.seed, spec.rank, r, spec.split, epoch, len(reader.names)):
            name = reader.names[i]
            keys = reader.keys[name]
            if skip >= len(keys):
                skip -= len(keys)
                continue
            wanted = set(keys[skip:])
            for s in checked_shard(spec.folder, spec.index, spec.split, name, wanted, name not in hashed, spec.skip):
                yield slice_record(spec, name, s)
            hashed.add(name)
            skip = 0
        epoch += 1


class SliceChunks(IterableDataset):
    """The chunks of one split's stream, global chunk c coming from reader c % R (R readers, one per
    DataLoader worker). Resuming at slice `start`, worker 0 plays the reader whose chunk comes next: the
    DataLoader always asks worker 0 first."""

    def __init__(self, spec: StreamSpec, start: int):
        self.spec, self.start = spec, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        i, n = (info.id, info.num_workers) if info else (0, 1)
        chunk = self.spec.chunk
        first = self.start // chunk
        r = (first + i) % n
        done = max(0, -(-(first - r) // n))  # chunks reader r handed over before chunk `first`
        slices = read_slices(self.spec, r, done * chunk)
        try:
            while True:
                part = list(itertools.islice(slices, chunk))
                yield {"keys": [p[0] for p in part], "img": torch.from_numpy(np.stack([p[1] for p in part])),
                       "lbl": torch.from_numpy(np.stack([p[2] for p in part])), "ways": [p[3] for p in part]}
        except FsctError as e:  # as a message: the DataLoader would re-raise it with a worker traceback
            yield {"error": str(e)}


class Feed:
    """One split's slices in stream order out of the DataLoader's chunks; `position` counts those taken."""

    def __init__(self, spec: StreamSpec, position: int, workers: int, pin: bool):
        self.position = position
        loader = DataLoader(SliceChunks(spec, position), batch_size=None, num_workers=workers, pin_memory=pin)
        self._chunks = iter(loader)
        self._chunk: dict | None = None
        self._i, self._skip = 0, position % spec.chunk  # the first chunk starts where the checkpoint left off

    def take(self) -> tuple[str, torch.Tensor, torch.Tensor, list[int]]:
        if self._chunk is None or self._i == len(self._chunk["keys"]):
            self._chunk = next(self._chunks)
            if "error" in self._chunk:
                raise FsctError(self._chunk["error"])
            self._i, self._skip = self._skip, 0
        c, i = self._chunk, self._i
        self._i += 1
        self.position += 1
        return c["keys"][i], c["img"][i], c["lbl"][i], c["ways"][i]


# --- the buffer ------------------------------------------------------------------------------------------

class ClassView:
    """ClassIndex's interface over the buffer: drawable label ids and the slots showing each."""

    def __init__(self, by_class: dict[int, set[int]], need: int):
        self.by_class = by_class
        self.ids = np.array(sorted(c for c, s in by_class.items() if len(s) >= need), dtype=np.int64)
        self.slices = self

    def __getitem__(self, c: int) -> np.ndarray:
        return np.array(sorted(self.by_class[c]), dtype=np.int64)


class NotDrawable(Exception):
    pass


class Buffer:
    """Slots of one split's slices on the training device; episodes of `modes` are drawn from them."""

    def __init__(self, spec: StreamSpec, cfg: EpisodeConfig, modes: set[str], capacity: int, uses: int,
                 device: torch.device):
        self.spec, self.cfg, self.modes, self.uses = spec, cfg, modes, uses
        s = spec.size
        self.images = torch.zeros((capacity, s, s), dtype=torch.uint8, device=device)
        self.labels = torch.zeros((capacity, s, s), dtype=torch.uint8, device=device)
        self.keys: list[str] = [""] * capacity
        self.ways: list[list[int]] = [[] for _ in range(capacity)]
        self.born = [0] * capacity  # stream position when the slot's slice entered
        self.left = [uses] * capacity  # steps that may still draw the slot's slice
        self.by_class: dict[int, set[int]] = {}
        self.present: dict[str, int] = {}  # key -> slots holding it
        self.hand = 0
        self.feed: Feed | None = None

    @property
    def capacity(self) -> int:
        return len(self.keys)

    def start(self, state: dict | None, workers: int, pin: bool) -> None:
        """Fill from the stream's start, or take back a checkpoint's slots and position."""
        if state is None:
            self.feed = Feed(self.spec, 0, workers, pin)
            self._replace(range(self.capacity))
            return
        slots = state["slots"]
        found = read_keys(self.spec, {k for k, _, _ in slots})
        for i, (key, born, left) in enumerate(slots):
            self._set(i, key, found[key][3], born)
            self.left[i] = left
        self.images.copy_(torch.from_numpy(np.stack([found[s[0]][1] for s in slots])))
        self.labels.copy_(torch.from_numpy(np.stack([found[s[0]][2] for s in slots])))
        self.hand = state["hand"]
        self.feed = Feed(self.spec, state["position"], workers, pin)

    def state(self) -> dict:
        return {"position": self.feed.position, "hand": self.hand,
                "slots": [list(s) for s in zip(self.keys, self.born, self.left, strict=True)]}

    def tensors(self) -> PoolTensors:
        return PoolTensors(self.images, self.labels, self.labels)  # mask or superpixel episodes alike

    # which episodes a slot can serve
    def _enters(self, ways: list[int]) -> bool:
        return ("class" in self.modes and len(ways) >= 1) or (
            bool(self.modes - {"class"}) and len(ways) >= self.cfg.n_way)

    def _usable_now(self, i: int) -> bool:
        ways, need = self.ways[i], self.cfg.k_shot + self.cfg.n_query
        return (bool(self.modes - {"class"}) and len(ways) >= self.cfg.n_way) or (
            "class" in self.modes and any(len(self.by_class[c]) >= need for c in ways))

    def view(self) -> SimpleNamespace:
        """What DRAW reads from a sampler, over the slots."""
        cand = np.array([i for i, w in enumerate(self.ways) if len(w) >= self.cfg.n_way], dtype=np.int64)
        return SimpleNamespace(pool=None, cfg=self.cfg, slice_candidates=cand, slice_ways=self.ways,
                               sp_candidates=cand, sp_ways=self.ways,
                               class_index=ClassView(self.by_class, self.cfg.k_shot + self.cfg.n_query))

    def draw(self, mode: str, seed: int, rank: int, step: int, e: int) -> Episode:
        """Episode e of `step`. When the slots cannot make one (a class episode needs n_way ids with K+Q
        slots each), the stalest slot makes room and the same draw is tried again."""
        for _ in range(2 * self.capacity + 1):
            view = self.view()
            try:
                if mode == "class" and len(view.class_index.ids) < self.cfg.n_way or (
                        mode != "class" and len(view.slice_candidates) == 0):
                    raise NotDrawable
                return DRAW[mode](view, rng_for(seed, rank, step, e))
            except (NotDrawable, FsctError):
                self._replace([self._stalest()])
        raise FsctError(f"{self.spec.folder}: a buffer of {self.capacity} slices of split '{self.spec.split}' "
                        f"cannot make a {mode} episode ({self.cfg.n_way} ways x {self.cfg.k_shot}+"
                        f"{self.cfg.n_query} slices): raise data.buffer_slices or use data.loader=memory")

    def _stalest(self) -> int:
        idle = [i for i in range(self.capacity) if not self._usable_now(i)]
        return min(idle or range(self.capacity), key=lambda i: (self.born[i], i))

    def refill(self, used: set[int]) -> None:
        """Count a use of the slots a step drew from and replace those used up, and any slot the clock hand
        finds unusable and old."""
        for i in used:
            self.left[i] -= 1
        out = {i for i in used if self.left[i] <= 0}
        for _ in range(max(1, len(used))):
            i = self.hand
            self.hand = (self.hand + 1) % self.capacity
            if self.feed.position - self.born[i] >= self.capacity and not self._usable_now(i):
                out.add(i)
        self._replace(sorted(out))

    def _set(self, i: int, key: str, ways: list[int], born: int) -> None:
        for c in self.ways[i]:
            self.by_class[c].discard(i)
        if self.keys[i]:
            self.present[self.keys[i]] -= 1
        self.keys[i], self.ways[i], self.born[i], self.left[i] = key, ways, born, self.uses
        if key:
            self.present[key] = self.present.get(key, 0) + 1
        for c in ways:
            self.by_class.setdefault(c, set()).add(i)

    def _next_slice(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor, list[int]]:
        """The next slice of the stream an episode can use and the buffer does not hold already (slot i's
        own is leaving); a slice held twice only when one round of the stream offers nothing else."""
        self._set(i, "", [], self.born[i])
        fallback = None
        for _ in range(self.spec.round):
            s = self.feed.take()
            if self._enters(s[3]):
                if not self.present.get(s[0]):
                    return s
                fallback = fallback or s
        if fallback is None:
            raise FsctError(f"{self.spec.folder}: no slice of split '{self.spec.split}' read by rank "
                            f"{self.spec.rank} can make a {'/'.join(sorted(self.modes))} episode "
                            f"({self.cfg.n_way} ways of >= {self.cfg.min_pixels} pixels)")
        return fallback

    def _replace(self, slots) -> None:
        for i in slots:
            key, img, lbl, ways = self._next_slice(i)
            self._set(i, key, ways, self.feed.position)
            # straight from the DataLoader's pinned chunk: on a GPU the copy does not wait for the host
            self.images[i].copy_(img, non_blocking=True)
            self.labels[i].copy_(lbl, non_blocking=True)


def read_keys(spec: StreamSpec, keys: set[str]) -> dict[str, tuple[str, np.ndarray, np.ndarray, list[int]]]:
    """Given slices of a split, read from their tars (each tar once): a checkpoint's buffer taken back."""
    samples = spec.index["splits"][spec.split]["samples"]
    missing = sorted(k for k in keys if k not in samples)
    if missing:
        raise FsctError(f"{spec.folder}: the checkpoint's stream holds slice '{missing[0]}', not in split "
                        f"'{spec.split}' (the shards changed since the checkpoint)")
    by_shard: dict[str, set[str]] = {}
    for k in keys:
        by_shard.setdefault(samples[k]["shard"], set()).add(k)
    out = {}
    for name in sorted(by_shard):
        for s in checked_shard(spec.folder, spec.index, spec.split, name, by_shard[name], skip=spec.skip):
            out[s["__key__"]] = slice_record(spec, name, s)
    return out


# --- one rank's streamed training data -------------------------------------------------------------------

class StreamData:
    """fsct.data.episodes.TrainSource for data.loader: stream. Buffers: "mask" (train split; class and
    slice episodes) and "superpixel" (unlabelled split), each with its own stream."""

    loader = "stream"

    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank = cfg, rank
        folder = Path(cfg.data.shards)
        index = read_index(folder)
        self.modes, self.weights = mode_weights(cfg.episodes)
        self.workers = max(1, cfg.data.num_workers)
        wanted = {"mask": (cfg.data.train_split, "mask.png", set(self.modes) - {"superpixel"}),
                  "superpixel": (cfg.data.unlabeled_split, "sp.png", set(self.modes) & {"superpixel"})}
        self.specs: dict[str, tuple[StreamSpec, set[str]]] = {}
        for name, (split, field, modes) in wanted.items():
            if modes:
                info = split_info(index, folder, split)
                readers = split_readers(folder, info, split, rank, world, self.workers)
                if rank == 0 and len(info["shards"]) < world * self.workers:
                    print(f"{folder}: split '{split}' has {len(info['shards'])} tars for {world} rank(s) x "
                          f"{self.workers} reader(s): readers share tars, each reading all of a tar to keep part "
                          "of it (re-shard with a smaller --shard-size for one tar per reader)", flush=True)
                own = index_subset(index, split, list(dict.fromkeys(n for r in readers for n in r.names)))
                self.specs[name] = (StreamSpec(folder, own, split, readers, cfg.train.seed, rank,
                                               cfg.data.image_size, field, cfg.episodes.min_pixels), modes)
        first = next(iter(self.specs.values()))[0]
        self.shard_names = list(dict.fromkeys(n for r in first.readers for n in r.names))
        self.share_keys = sorted({k for r in first.readers for ks in r.keys.values() for k in ks}, key=key_order)
        self.buffers: dict[str, Buffer] = {}
        self._resume: dict | None = None
        self._next_micro = 0

    def restore(self, ckpt: Path | None, rank: int) -> None:
        self._resume = None
        if ckpt is None:
            return
        path = ckpt / STATE.format(rank=rank)
        if not path.is_file():
            print(f"{ckpt}: no stream state for rank {rank} (a data.loader=memory checkpoint?): the stream "
                  "starts afresh", flush=True)
            return
        try:
            state = json.loads(path.read_text())
            ok = state["version"] == STATE_VERSION and set(state["buffers"]) == set(self.specs)
        except (ValueError, KeyError, TypeError) as e:
            raise FsctError(f"{path}: corrupt stream state ({e})") from e
        if not ok:
            raise FsctError(f"{path}: stream state of another layout (buffers {sorted(state['buffers'])}); "
                            "resume with the episode mix the checkpoint was trained with")
        if state["workers"] != self.workers:
            raise FsctError(f"{path}: the stream was read by {state['workers']} reader(s); resume with "
                            f"data.num_workers={state['workers'] if state['workers'] > 1 else 0} to draw the same "
                            "episodes")
        self._resume = state

    def save(self, ckpt: Path, rank: int) -> None:
        from fsct.runs import write_json

        write_json(ckpt / STATE.format(rank=rank), {
            "version": STATE_VERSION, "workers": self.workers, "micro_step": self._next_micro,
            "buffers": {name: b.state() for name, b in self.buffers.items()}})

    def open(self, cfg: Config, start: int, where: torch.device, pin: bool = False) -> None:
        """The buffers on `where`, filled from the stream's start or taken back from `restore`'s state."""
        state = self._resume
        if state is not None and state["micro_step"] != start * cfg.optim.grad_accum:
            raise FsctError(f"stream state of micro-step {state['micro_step']}, resuming at step {start}")
        for name, (spec, modes) in self.specs.items():
            b = Buffer(spec, cfg.episodes, modes, min(cfg.data.buffer_slices, spec.n_slices), cfg.data.slice_uses,
                       where)
            b.start(state["buffers"][name] if state else None, cfg.data.num_workers, pin)
            self.buffers[name] = b

    def draw_step(self, micro: int) -> tuple[Buffer, list[Episode]]:
        """The buffer micro-step `micro` draws from, and its episodes (refill the buffer once used)."""
        mode = mode_at(self.cfg.train.seed, self.rank, micro, self.modes, self.weights)
        buf = self.buffers["superpixel" if mode == "superpixel" else "mask"]
        e = self.cfg.episodes
        episodes = [buf.draw(mode, self.cfg.train.seed, self.rank, micro, i) for i in range(e.episodes_per_step)]
        self._next_micro = micro + 1
        return buf, episodes

    def batches(self, cfg: Config, start: int, dev: torch.device) -> Iterator[tuple[list[list[str]], Batch]]:
        where = dev if cfg.data.cache_on_device else torch.device("cpu")
        self.open(cfg, start, where, pin=dev.type == "cuda")
        for micro in range(start * cfg.optim.grad_accum, cfg.train.max_steps * cfg.optim.grad_accum):
            buf, episodes = self.draw_step(micro)
            keys = [[buf.keys[i] for i in (*ep.support, *ep.query)] for ep in episodes]
            gen = step_generator(cfg.train.seed, self.rank, micro, where)
            batch = make_batch(episodes, buf.tensors(), cfg.episodes.n_way, cfg.augment, gen, buf.tensors())
            buf.refill(used_slots(episodes))  # after make_batch: the batch holds copies of the slots
            yield keys, batch.to(dev)


def used_slots(episodes: list[Episode]) -> set[int]:
    return {int(i) for ep in episodes for i in (*ep.support, *ep.query)}

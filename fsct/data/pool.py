"""Reading shards back: index.json, the tars it lists (checked against it), and `load_split` -> `Pool`, the
decoded slices that training, prediction and episodes draw from. The writer is fsct.data.shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fsct.errors import FsctError

INDEX = "index.json"
VERSION = 1


def decode(name: str, data: bytes) -> np.ndarray | dict:
    """Decode one tar member by its extension (what webdataset calls the field name)."""
    if name.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if name.endswith(".png"):
        return np.asarray(Image.open(io.BytesIO(data)))
    if name.endswith(".json"):
        return json.loads(data)
    raise ValueError(f"unknown field {name}")



def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()



def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FsctError(f"{path}: not found (is {folder} a folder written by `fsct shard`?)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FsctError(f"{path}: corrupt index ({e})") from e
    if index.get("version") != VERSION or "splits" not in index:
        raise FsctError(f"{path}: not an fsct index (version {index.get('version')!r})")
    return index



def iter_shard(path: Path, keys: set[str] | None = None, skip: frozenset[str] = frozenset()) -> Iterator[dict]:
    """Samples of one tar as {field: decoded value}, grouped by key, in file order (webdataset's layout).
    With `keys`, a sample outside them comes as its key alone: a reader of part of a tar decodes only that.
    Fields in `skip` are left out (a label map the reader has no use for is not decoded)."""
    import webdataset as wds

    ds = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None,
                        empty_check=False)
    for raw in ds:
        sample = {"__key__": raw["__key__"]}
        if keys is None or raw["__key__"] in keys:
            for k, v in raw.items():
                if not k.startswith("__") and k not in skip:
                    sample[k] = decode(k, v)
        yield sample


def rank_subset(shards: Path, split: str, rank: int, world: int) -> tuple[list[str], set[str] | None]:
    """This rank's shards; with fewer shards than ranks, every rank reads all and keeps every world-th key."""
    return share(split_info(read_index(shards), shards, split), rank, world)


def split_info(index: dict, shards: Path, split: str) -> dict:
    info = index["splits"].get(split)
    if info is None:
        raise FsctError(f"{shards}: no split '{split}' in index.json")
    return info


def share(info: dict, rank: int, world: int) -> tuple[list[str], set[str] | None]:
    """rank_subset on a split's index entry: shards[rank::world], or all shards and every world-th key."""
    names = [s["name"] for s in info["shards"]]
    if len(names) >= world:
        return names[rank::world], None
    return names, set(sorted(info["samples"], key=key_order)[rank::world])


def index_subset(index: dict, split: str, names: list[str]) -> dict:
    """What checked_shard needs to read these tars of a split (entries, and their samples without classes):
    a reader of a few tars of a big data set keeps this, not the whole parsed index (~3 KB per slice)."""
    info, wanted = index["splits"][split], set(names)
    return {"splits": {split: {
        "shards": [s for s in info["shards"] if s["name"] in wanted],
        "samples": {k: {"shard": v["shard"]} for k, v in info["samples"].items() if v["shard"] in wanted}}}}


def shard_keys(info: dict, name: str) -> list[str]:
    """The keys of one tar of a split, in file order (index.json lists samples as they were written)."""
    return [k for k, v in info["samples"].items() if v["shard"] == name]


def key_order(k: str) -> tuple[int, str]:
    """Slice keys sort numerically, as the challenge orders slices (2 before 10)."""
    return (int(k), k) if k.isdigit() else (1 << 62, k)


@dataclass
class Pool:
    """Decoded slices of a split, resized for training: what episodes draw from."""

    keys: list[str]
    images: np.ndarray  # (N, S, S) uint8
    masks: np.ndarray | None  # (N, S, S) uint8
    superpixels: np.ndarray | None  # (N, S, S) uint8
    classes: list[dict[str, int]]  # per slice: label id -> pixels at full size

    def __len__(self) -> int:
        return len(self.keys)


def to_unit(u8: Any) -> Any:
    """uint8 pixel tensor -> float in [0, 1]: what augmentation works on."""
    return u8.float() / 255.0


def normalise(unit: Any) -> Any:
    """[0, 1] pixels -> [-1, 1], the model's input (the seed notebook's normalisation)."""
    return (unit - 0.5) / 0.5


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if a.shape[-1] == size:
        return a
    img = Image.fromarray(a)
    return np.asarray(img.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def sample_arrays(s: dict, size: int | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A decoded sample's image, mask and superpixels (None where the tar has none), resized to `size`."""
    img = next(v for k, v in s.items() if k.startswith("img."))
    size = size or img.shape[-1]
    label = lambda field: _resize(s[field], size, nearest=True) if field in s else None  # noqa: E731
    return _resize(img, size, nearest=False), label("mask.png"), label("sp.png")


def load_split(folder: Path | str, split: str, shard_names: list[str] | None = None, size: int | None = None,
               keys: set[str] | None = None) -> Pool:
    """Read (some shards of) a split back into memory, decoded and resized to `size`."""
    folder = Path(folder)
    index = read_index(folder)
    if split not in index["splits"]:
        raise FsctError(f"{folder}: no split '{split}' (have: {', '.join(sorted(index['splits']))})")
    names = shard_names if shard_names is not None else [s["name"] for s in index["splits"][split]["shards"]]
    out_keys, imgs, msks, sps, cls = [], [], [], [], []
    for name in names:
        for s in checked_shard(folder, index, split, name, keys):
            img, mask, sp = sample_arrays(s, size)
            out_keys.append(s["__key__"])
            imgs.append(img)
            if mask is not None:
                msks.append(mask)
            if sp is not None:
                sps.append(sp)
            cls.append(s["meta.json"]["classes"])
    n = len(out_keys)
    stack = lambda xs: np.stack(xs) if xs and len(xs) == n else None  # noqa: E731
    empty = np.zeros((0, size or 512, size or 512), np.uint8)
    return Pool(out_keys, stack(imgs) if n else empty, stack(msks), stack(sps), cls)


def checked_shard(folder: Path, index: dict, split: str, name: str, keys: set[str] | None = None,
                  checksum: bool = True, skip: frozenset[str] = frozenset()) -> Iterator[dict]:
    """The samples of one listed tar (those in `keys`, when given; without the fields in `skip`), after
    checking it against index.json: size and checksum first, then exactly the listed keys in order. A
    disagreement stops with one line naming the tar. `checksum=False` skips the hash (a stream reopening a
    tar it has hashed already)."""
    info = index["splits"][split]
    entry = next((s for s in info["shards"] if s["name"] == name), None)
    path = folder / name
    if entry is None:
        raise FsctError(f"{path}: not listed for split {split} in {folder / INDEX}")
    if not path.is_file():
        raise FsctError(f"{path}: listed in {folder / INDEX} but missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise FsctError(f"{path}: {size} bytes, {folder / INDEX} says {entry['bytes']} (damaged or replaced; "
                        "re-run `fsct shard`)")
    if checksum and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        raise FsctError(f"{path}: checksum differs from {folder / INDEX} (damaged; re-run `fsct shard`)")
    expected = set(shard_keys(info, name))
    seen: set[str] = set()
    try:
        for s in iter_shard(path, keys, skip):
            key = s["__key__"]
            if key not in expected or key in seen:
                raise FsctError(f"{path}: sample '{key}' is not listed (once) for this tar in {folder / INDEX}")
            seen.add(key)
            if keys is None or key in keys:
                yield s
    except (tarfile.TarError, OSError, ValueError, KeyError) as e:
        raise FsctError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if len(seen) != len(expected):
        raise FsctError(f"{path}: {len(seen)} samples, {folder / INDEX} lists {len(expected)}")

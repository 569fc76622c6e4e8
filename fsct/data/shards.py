"""`fsct shard`: challenge files -> WebDataset tar shards + index.json; `--verify` re-reads them (reading
for training and prediction is fsct.data.pool).

One sample per slice, key = image stem: `img.npy` (raw uint8: 0.06 ms to decode vs 2.3 ms for PNG, see
docs/PERFORMANCE.md), `mask.png` (label maps are mostly flat, so PNG is ~1 KB and 0.7 ms), `sp.png`
(superpixel pseudo-labels, when computed) and `meta.json`.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import shutil
import signal
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fsct.atomic import atomic_file, fault_point, remove_stale, replace_dir, temp_dir
from fsct.data.challenge import column_to_image, list_images, read_image, read_labels
from fsct.data.pool import INDEX, VERSION, file_sha256, iter_shard, read_index
from fsct.errors import FsctError
from fsct.lock import locked
from fsct.progress import track

# --- encoding -------------------------------------------------------------------------------------------

def encode_png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def class_counts(mask: np.ndarray) -> dict[str, int]:
    counts = np.bincount(mask.ravel(), minlength=256)
    return {str(c): int(counts[c]) for c in np.flatnonzero(counts) if c != 0}


@dataclass
class Job:
    """What a worker process needs to build one sample."""

    key: str
    image_path: Path
    mask: np.ndarray | None
    image_encoding: str
    superpixels: bool


def build_sample(job: Job) -> dict[str, bytes]:
    image = read_image(job.image_path)
    sample = {"__key__": job.key}
    sample["img." + job.image_encoding] = encode_npy(image) if job.image_encoding == "npy" else encode_png(image)
    meta = {"key": job.key, "source": job.image_path.name, "classes": {}}
    if job.mask is not None:
        sample["mask.png"] = encode_png(job.mask)
        meta["classes"] = class_counts(job.mask)
    if job.superpixels:
        from fsct.data.superpixels import superpixels

        sample["sp.png"] = encode_png(superpixels(image))
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


# --- writing --------------------------------------------------------------------------------------------

class SplitWriter:
    """Writes `{split}-{000000..}.tar`, starting a new shard by sample count or bytes."""

    def __init__(self, folder: Path, split: str, max_count: int, max_bytes: int, generation: int = 0):
        self.folder, self.split, self.max_count, self.max_bytes = folder, split, max_count, max_bytes
        # Each commit writes new file names, so a new split's tars never replace a listed one in place.
        self.prefix = split if generation == 0 else f"{split}-g{generation:06d}"
        self.shards: list[dict] = []
        self.samples: dict[str, dict] = {}
        self.classes: dict[str, list[list[str]]] = {}
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "n_samples": 0, "bytes": 0})

    def write(self, sample: dict[str, bytes]) -> None:
        size = sum(len(v) + 512 for k, v in sample.items() if k != "__key__")
        cur = self.shards[-1] if self.shards else None
        if cur is None or cur["n_samples"] >= self.max_count or (
                cur["n_samples"] > 0 and cur["bytes"] + size > self.max_bytes):
            self.close()
            self._open()
            cur = self.shards[-1]
        key = sample["__key__"]
        for field in sorted(k for k in sample if k != "__key__"):
            data = sample[field]
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed mtime: same input, same bytes
            self._tar.addfile(info, io.BytesIO(data))
        cur["n_samples"] += 1
        cur["bytes"] += size
        meta = json.loads(sample["meta.json"])
        self.samples[key] = {"shard": cur["name"], "classes": meta["classes"]}
        for c in meta["classes"]:
            self.classes.setdefault(c, []).append([cur["name"], key])

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            last = self.shards[-1]
            last["bytes"] = (self.folder / last["name"]).stat().st_size
            last["sha256"] = file_sha256(self.folder / last["name"])

    def summary(self) -> dict:
        classes = {c: self.classes[c] for c in sorted(self.classes, key=int)}
        n_struct = [len(s["classes"]) for s in self.samples.values()]
        return {"n_samples": len(self.samples), "shards": self.shards, "samples": self.samples,
                "classes": classes, "stats": {
                    "n_classes": len(classes),
                    "structures_per_slice_mean": float(np.mean(n_struct)) if n_struct else 0.0,
                    "foreground_fraction_mean": float(np.mean(
                        [sum(s["classes"].values()) / 512 ** 2 for s in self.samples.values()]))
                    if self.samples else 0.0}}


def assign_splits(keys: list[str], masks: dict[str, np.ndarray | None], val_fraction: float,
                  seed: int) -> dict[str, str]:
    """key -> split. Empty or missing masks are unlabeled; labelled slices go to val by a seeded draw."""
    labelled = [k for k in keys if masks[k] is not None and masks[k].any()]
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(labelled)))
    val = set(rng.permutation(np.array(labelled, dtype=object))[:n_val].tolist()) if n_val else set()
    out = {}
    for k in keys:
        if masks[k] is None or not masks[k].any():
            out[k] = "unlabeled"
        else:
            out[k] = "val" if k in val else "train"
    return out


def shard_dataset(images: Path, labels: Path | None, out: Path, split: str | None = None,
                  val_fraction: float = 0.2, val_classes: list[int] | None = None, seed: int = 0,
                  max_count: int = 256, max_bytes: int = 512 << 20, image_encoding: str = "npy",
                  superpixels: bool = False, workers: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Build shards for the splits this input produces and merge them into `out` (atomically)."""
    paths = list_images(images)
    names = [p.name for p in paths]
    masks: dict[str, np.ndarray | None] = {p.stem: None for p in paths}
    source: dict[str, str] = {"images": str(images)}
    if labels is not None:
        columns, arr = read_labels(labels, names)
        for j, i in enumerate(column_to_image(columns, names)):
            masks[paths[i].stem] = arr[j]
        source["labels"] = str(labels)
    val_classes = sorted(set(val_classes or []))
    if val_classes and labels is not None:
        lut = np.arange(256, dtype=np.uint8)
        lut[val_classes] = 0  # held-out classes are background in train: the model never sees them
    if split is not None:  # e.g. test slices, with their truth masks when labels are given
        assignment = {p.stem: split for p in paths}
    else:
        assignment = assign_splits([p.stem for p in paths], masks, val_fraction, seed)

    with locked(out, "shard folder"):
        return _write_locked(paths, masks, assignment, source, labels, out, val_fraction, val_classes,
                             seed, max_count, max_bytes, image_encoding, superpixels, workers, overwrite,
                             progress, lut if val_classes and labels is not None else None)


def _write_locked(paths, masks, assignment, source, labels, out, val_fraction, val_classes, seed, max_count,
                  max_bytes, image_encoding, superpixels, workers, overwrite, progress, lut) -> dict:
    remove_stale(out)  # we hold the lock: temporaries beside `out` belong to killed writers
    remove_stale(out / INDEX)
    existing = read_index(out) if (out / INDEX).is_file() else None
    if existing is not None:
        _remove_unlisted(out, existing)
    if out.exists() and existing is None and any(out.iterdir()):
        if not overwrite:
            raise FsctError(f"{out}: output exists and is not an fsct shard folder (pass --overwrite)")
    new_splits = sorted(set(assignment.values()))
    if existing is not None and not overwrite:
        clash = [s for s in new_splits if s in existing["splits"]]
        if clash:
            raise FsctError(f"{out}: split(s) {', '.join(clash)} exist (pass --overwrite to replace them)")
    generation = existing.get("generation", 0) + 1 if existing is not None else 0

    tmp = temp_dir(out)
    try:
        writers = {s: SplitWriter(tmp, s, max_count, max_bytes, generation) for s in new_splits}
        jobs = []
        for p in paths:
            m = masks[p.stem]
            s = assignment[p.stem]
            if m is not None and s == "train" and lut is not None:
                m = lut[m]
            if m is not None and not m.any():
                m = None
            jobs.append(Job(p.stem, p, m, image_encoding, superpixels and s in ("train", "unlabeled")))
        for sample, job in zip(track(_map(build_sample, jobs, workers), total=len(jobs), desc="shard",
                                     enabled=progress), jobs, strict=True):
            writers[assignment[job.key]].write(sample)
            fault_point("shard:sample")
        for w in writers.values():
            w.close()
        index = existing if existing is not None else {"version": VERSION, "splits": {}}
        index.update({"version": VERSION, "encoding": {"img": image_encoding, "mask": "png"},
                      "seed": seed, "val_fraction": val_fraction, "generation": generation})
        if labels is not None:
            index["val_classes"] = val_classes
        index.setdefault("val_classes", [])
        index.setdefault("sources", {})
        for s in new_splits:
            index["splits"][s] = writers[s].summary()
            index["sources"][s] = source
        index["stats"] = _dataset_stats(index)
        _commit(tmp, out, index, existing is not None)
    except OSError as e:  # a full disk, most often: the old index and tars are untouched
        what = f"{e.strerror}: {e.filename}" if e.filename else (e.strerror or str(e))
        raise FsctError(f"{out}: shard write failed ({what}); nothing was changed") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def grow_splits(src: Path, out: Path, sizes: dict[str, int], shard_size: int = 256) -> dict:
    """A bigger shard folder from a small one: `sizes[split]` slices of each split, `src`'s slices repeated
    under new keys 0..n-1, written as `fsct shard` writes them (tars + index.json with checksums). For scaling
    tests and benchmarks: a data set far bigger than a loader's memory, at the cost of a small one."""
    index = read_index(src)
    out = Path(out)
    if out.exists():
        raise FsctError(f"{out}: exists (grow_splits writes a new folder)")
    tmp = temp_dir(out)
    try:
        splits = {}
        for split, n in sizes.items():
            info = index["splits"].get(split)
            if info is None or not info["n_samples"]:
                raise FsctError(f"{src}: no slices in split '{split}' to grow")
            base = list(_raw_samples(src, info))
            writer = SplitWriter(tmp, split, shard_size, 1 << 40)
            for i in range(n):
                sample = dict(base[i % len(base)])
                meta = json.loads(sample["meta.json"])
                sample["__key__"] = meta["key"] = str(i)
                sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
                writer.write(sample)
            writer.close()
            splits[split] = writer.summary()
        grown = {"version": VERSION, "encoding": index.get("encoding", {}), "seed": index.get("seed", 0),
                 "val_fraction": index.get("val_fraction", 0.0), "val_classes": index.get("val_classes", []),
                 "generation": 0, "sources": {s: {"grown_from": str(src)} for s in splits}, "splits": splits}
        grown["stats"] = _dataset_stats(grown)
        _commit(tmp, out, grown, merge=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return grown


def _raw_samples(folder: Path, info: dict) -> Iterator[dict[str, bytes]]:
    """A split's samples as the tars hold them ({field: bytes}), in index order."""
    for shard in info["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            sample: dict[str, bytes] = {}
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[field] = tar.extractfile(m).read()
            if sample:
                yield sample


def _dataset_stats(index: dict) -> dict:
    splits = index["splits"]
    classes = set().union(*(set(s["classes"]) for s in splits.values())) if splits else set()
    return {"n_samples": sum(s["n_samples"] for s in splits.values()),
            "n_samples_per_split": {k: s["n_samples"] for k, s in sorted(splits.items())},
            "n_classes": len(classes)}


def _die_with_parent() -> None:
    """Worker initializer: the kernel kills this worker when the `fsct shard` process dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: workers then exit on their own at their next job (a broken pipe)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _map(fn, jobs: list, workers: int | None) -> Iterator:
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < 8:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers, initializer=_die_with_parent) as pool:
        yield from pool.map(fn, jobs, chunksize=8)


def _write_index(path: Path, index: dict) -> None:
    with atomic_file(path) as t:
        with open(t, "w") as f:
            f.write(json.dumps(index, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())


def _commit(tmp: Path, out: Path, index: dict, merge: bool) -> None:
    """Switch `out` over to `index` in one atomic rename; a crash before it leaves the old index and tars
    as they were (plus unlisted new tars, removed by the next run), a crash after it leaves unlisted old
    tars (likewise removed). Readers only open tars the index lists."""
    if not merge:
        _write_index(tmp / INDEX, index)
        fault_point("shard:before-rename")
        replace_dir(tmp, out)
        return
    moved = []
    try:
        for f in sorted(tmp.glob("*.tar")):  # new generation: names no listed tar has
            f.rename(out / f.name)
            moved.append(out / f.name)
        fault_point("shard:before-index")
        _write_index(out / INDEX, index)
    except BaseException:
        for m in moved:
            m.unlink(missing_ok=True)
        raise
    fault_point("shard:after-index")
    _remove_unlisted(out, index)


def _remove_unlisted(out: Path, index: dict) -> None:
    """Tars in `out` that the index does not list: left by a merge that was killed. Call under the lock."""
    listed = {s["name"] for info in index["splits"].values() for s in info["shards"]}
    for t in out.glob("*.tar"):
        if t.name not in listed:
            t.unlink(missing_ok=True)



def verify(folder: Path) -> dict[str, int]:
    """Re-read every shard against index.json; raise FsctError on the first disagreement."""
    index = read_index(folder)
    counts = {}
    for split, info in index["splits"].items():
        seen = 0
        for shard in info["shards"]:
            path = folder / shard["name"]
            if not path.is_file():
                raise FsctError(f"{path}: listed in index.json but missing")
            if path.stat().st_size != shard["bytes"]:
                raise FsctError(f"{path}: {path.stat().st_size} bytes, index.json says {shard['bytes']}")
            if "sha256" in shard and file_sha256(path) != shard["sha256"]:
                raise FsctError(f"{path}: checksum differs from index.json")
            n = 0
            try:
                for s in iter_shard(path):
                    _verify_sample(path, s, info)
                    n += 1
            except (tarfile.TarError, OSError, ValueError) as e:
                raise FsctError(f"{path}: unreadable ({e})") from e
            if n != shard["n_samples"]:
                raise FsctError(f"{path}: {n} samples, index.json says {shard['n_samples']}")
            seen += n
        if seen != info["n_samples"]:
            raise FsctError(f"{folder}: split {split} has {seen} samples, index.json says {info['n_samples']}")
        counts[split] = seen
    listed = {s["name"] for info in index["splits"].values() for s in info["shards"]}
    unlisted = sorted(t.name for t in folder.glob("*.tar") if t.name not in listed)
    if unlisted:
        raise FsctError(f"{folder / unlisted[0]}: not listed in index.json (left by an interrupted write; "
                        "the next `fsct shard --out` into this folder removes it)")
    return counts


def _verify_sample(path: Path, s: dict, info: dict) -> None:
    key = s["__key__"]
    entry = info["samples"].get(key)
    if entry is None or entry["shard"] != path.name:
        raise FsctError(f"{path}: sample {key} is not listed for this shard in index.json")
    img = next((v for k, v in s.items() if k.startswith("img.")), None)
    if img is None or img.shape != (512, 512) or img.dtype != np.uint8:
        raise FsctError(f"{path}: sample {key} has no 512x512 uint8 image")
    if "mask.png" in s:
        if s["mask.png"].shape != (512, 512):
            raise FsctError(f"{path}: sample {key} mask is {s['mask.png'].shape}, expected (512, 512)")
        if class_counts(s["mask.png"]) != entry["classes"]:
            raise FsctError(f"{path}: sample {key} mask classes disagree with index.json")
    for c in entry["classes"]:
        if [path.name, key] not in info["classes"].get(c, []):
            raise FsctError(f"{path}: sample {key} missing from index.json's class {c} list")


# --- command --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, help="folder of slices (X_train/ or X_train/images/)")
    p.add_argument("--labels", type=Path, help="Y_train.csv(.gz); omit for test images")
    p.add_argument("--out", type=Path, default=Path("shards/data"), help="output folder (default %(default)s)")
    p.add_argument("--split", help="write every slice to this split (e.g. test); default: train/val/unlabeled")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--val-classes", default="", help="comma-separated label ids held out of train entirely")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=256, help="max samples per shard")
    p.add_argument("--shard-bytes", type=int, default=512 << 20, help="max bytes per shard")
    p.add_argument("--image-encoding", choices=["npy", "png"], default="npy")
    p.add_argument("--superpixels", action=argparse.BooleanOptionalAction, default=False,
                   help="store superpixel pseudo-labels for train and unlabeled slices")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verify", type=Path, metavar="DIR", help="re-read every shard of DIR against index.json")


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        counts = verify(args.verify)
        print(f"{args.verify}: ok ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
        return 0
    if args.images is None:
        raise FsctError("--images is required (or --verify DIR)")
    try:
        val_classes = [int(c) for c in args.val_classes.split(",") if c.strip()]
    except ValueError as e:
        raise FsctError(f"--val-classes: '{args.val_classes}' is not a comma-separated list of ids") from e
    index = shard_dataset(args.images, args.labels, args.out, split=args.split, val_fraction=args.val_fraction,
                          val_classes=val_classes, seed=args.seed, max_count=args.shard_size,
                          max_bytes=args.shard_bytes, image_encoding=args.image_encoding,
                          superpixels=args.superpixels, workers=args.workers, overwrite=args.overwrite)
    per = ", ".join(f"{k} {v}" for k, v in index["stats"]["n_samples_per_split"].items())
    print(f"{args.out}: {per} slices; {index['stats']['n_classes']} label ids; index {args.out / INDEX}")
    return 0

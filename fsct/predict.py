"""`fsct predict`: checkpoint + support shards + test slices -> the submission CSV.

Alone or under `accelerate launch` on many processes/nodes: test slices are split across ranks, support
prototypes are computed once per rank (K shots per class, a seeded choice, batched), every rank writes its
part atomically, rank 0 merges when all parts exist. A re-run after a crash skips finished parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fsct.atomic import atomic_file, fault_point, remove_stale
from fsct.body_scale import Frames, body_frames, from_frames, to_frames
from fsct.checkpoint import load_model, weights_path
from fsct.config import Config, PredictConfig, to_dict
from fsct.data.challenge import list_images, read_image
from fsct.data.pool import Pool, key_order, load_split, normalise, rank_subset, to_unit
from fsct.errors import FsctError
from fsct.lock import locked
from fsct.malloc import keep_freed_memory
from fsct.model.panet import PANet
from fsct.progress import track
from fsct.submission import write_submission
from fsct.vote import Voters, shard_voters, vote_on

OUT_SIZE = 512


@dataclass
class Prototypes:
    class_ids: np.ndarray  # (K,) label ids of the foreground prototypes
    protos: torch.Tensor  # (K+1, C): background first (zeros for the seed variant, which has none)


def choose_support(pool: Pool, k_shot: int, seed: int) -> dict[int, list[int]]:
    """label id -> up to k_shot pool slices showing it; a seeded, order-independent choice."""
    by_class: dict[int, list[int]] = {}
    for i, classes in enumerate(pool.classes):
        for c in classes:
            by_class.setdefault(int(c), []).append(i)
    rng = np.random.default_rng(seed)
    return {c: sorted(rng.choice(v, min(k_shot, len(v)), replace=False).tolist())
            for c, v in sorted(by_class.items())}


@torch.no_grad()
def support_prototypes(model: PANet, pool: Pool, cfg: PredictConfig, device: torch.device) -> Prototypes:
    """Every support class's prototype from its own K slices, plus one background prototype from all of
    them: computed once, then reused for every query slice."""
    if pool.masks is None:
        raise FsctError("support split has no masks")
    chosen = choose_support(pool, cfg.k_shot, cfg.seed)
    if not chosen:
        raise FsctError("support split has no labelled structure")
    ids = np.array(sorted(chosen), dtype=np.int64)
    used = sorted({i for v in chosen.values() for i in v})
    row = {s: r for r, s in enumerate(used)}
    k = len(ids) + 2  # 0 background, 1..K classes, K+1 everything not chosen (ignored)
    lut = torch.full((256,), k - 1, dtype=torch.long)
    lut[0] = 0
    lut[torch.from_numpy(ids)] = torch.arange(1, len(ids) + 1)
    weight = torch.zeros(len(used), k)  # slice r contributes to class j only if it was chosen for it
    weight[:, 0] = 1
    for j, c in enumerate(ids, start=1):
        weight[[row[s] for s in chosen[int(c)]], j] = 1

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(used), cfg.batch_size):
            idx = used[start:start + cfg.batch_size]
            x = normalise(to_unit(torch.from_numpy(pool.images[idx]).to(device))).unsqueeze(1)
            labels = lut[torch.from_numpy(pool.masks[idx]).long()].to(device)
            yield x, labels, weight[start:start + len(idx)].to(device)

    protos = model.support_prototypes(batches(), k - 1)
    return Prototypes(ids, protos)


def _input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    return F.interpolate(normalise(to_unit(images)).unsqueeze(1), size=(image_size, image_size), mode="bilinear",
                         align_corners=False, antialias=True)


@torch.no_grad()
def predict_batch(model: PANet, protos: Prototypes, images: torch.Tensor, cfg: PredictConfig,
                  image_size: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """uint8 (B,512,512) -> label ids (B,512,512) uint8 by argmax over background + support classes, plus
    the upsampled logits and low-resolution features (what partition inference refines)."""
    x = _input(images, image_size)
    feats = model.features(x).float()
    if cfg.tta_flip:
        feats = 0.5 * (feats + model.features(x.flip(-1)).float().flip(-1))
    logits = model.class_logits(feats, protos.protos)
    up = F.interpolate(logits, size=(OUT_SIZE, OUT_SIZE), mode="bilinear", align_corners=False)
    ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(protos.class_ids)]).to(up.device)
    labels = ids[up.argmax(1)]
    return labels.to(torch.uint8).cpu().numpy(), up, feats


@torch.no_grad()
def dense_maps(model: PANet, images: torch.Tensor, tta_flip: bool, image_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B,H,W) slices -> the model's boundary probabilities (B,h,w) and embeddings (B,C,h,w), both at its
    stride 2."""
    x = _input(images, image_size)
    emb, logit = model.dense(x)
    prob, emb = torch.sigmoid(logit.float()), emb.float()
    if tta_flip:
        emb_f, logit_f = model.dense(x.flip(-1))
        prob = 0.5 * (prob + torch.sigmoid(logit_f.float()).flip(-1))
        emb = 0.5 * (emb + emb_f.float().flip(-1))
    return prob, emb


def model_draws_partition(cfg: PredictConfig) -> bool:
    """The partition comes from a dense model (`learned`, `boundary`): no class prototypes (the support slices
    only vote on `learned`'s merges, with predict.support_vote)."""
    return cfg.mode == "partition" and cfg.partition_split in ("learned", "boundary")


@dataclass
class FramedMaps:
    """A dense model's maps of slices seen at the training's body scale (fsct.body_scale): the partition is
    drawn on `seen` and mapped back to the slices' own pixels through `frames`."""

    prob: torch.Tensor  # (B,h,w) boundary probabilities
    emb: torch.Tensor  # (B,C,h,w) embeddings
    seen: torch.Tensor  # (B,H,W) uint8: the slices as the model saw them
    frames: Frames


def framed_maps(model: PANet, images: torch.Tensor, cfg: PredictConfig, image_size: int,
                batch: int | None = None) -> FramedMaps:
    """`dense_maps` of uint8 (B,H,W) slices, each seen through its body-scale window (cfg.body_size); with
    `batch`, that many slices at a time."""
    frames = body_frames(images, cfg.body_size, cfg.body_tolerance)
    seen = to_frames(images, frames)
    step = batch or max(len(seen), 1)
    maps = [dense_maps(model, seen[i:i + step], cfg.tta_flip, image_size) for i in range(0, len(seen), step)]
    prob, emb = (torch.cat(m) for m in zip(*maps, strict=True))
    return FramedMaps(prob, emb, seen, frames)


def learned_masks(model: PANet, images: torch.Tensor, cfg: PredictConfig, image_size: int,
                  voters: Voters | None = None) -> np.ndarray:
    """A partition of uint8 (B,512,512) slices drawn from the model: `learned` (the watershed basins of its
    boundary map merged by their borders and embeddings, and with `voters` by the support slices' vote) or
    `boundary` (CPU superpixels merged where the model sees no border)."""
    from fsct.partition import boundary_merge_slice, learned_partition

    m = framed_maps(model, images, cfg, image_size)
    if cfg.partition_split == "learned":
        return from_frames(learned_partition(m.prob, cfg, OUT_SIZE, m.emb, voters), m.frames)
    full = F.interpolate(m.prob[:, None], size=(OUT_SIZE, OUT_SIZE), mode="bilinear", align_corners=False)[:, 0]
    imgs = m.seen.cpu().numpy()
    return from_frames(np.stack([boundary_merge_slice(im, p, cfg)
                                 for im, p in zip(imgs, full.cpu().numpy(), strict=True)]), m.frames)


@dataclass
class Queries:
    keys: list[str]
    load: Callable[[list[str]], np.ndarray]  # keys -> uint8 (B,512,512)


def query_source(images: Path, split: str, rank: int, world: int) -> Queries:
    """This rank's test slices: shards[rank::world] of a shard folder, or every world-th PNG of a folder."""
    if (images / "index.json").is_file():
        names, keys = rank_subset(images, split, rank, world)
        pool = load_split(images, split, names, keys=keys)
        pos = {k: i for i, k in enumerate(pool.keys)}
        return Queries(pool.keys, lambda ks: pool.images[[pos[k] for k in ks]])
    paths = list_images(images)[rank::world]
    by_key = {p.stem: p for p in paths}
    return Queries([p.stem for p in paths], lambda ks: np.stack([read_image(by_key[k]) for k in ks]))


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def part_path(out: Path, rank: int, world: int) -> Path:
    return parts_dir(out) / f"part-{rank:05d}-of-{world:05d}.npz"


def _batched(keys: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(keys), n):
        yield keys[i:i + n]


def predict(checkpoint: Path, support: Path, images: Path, out: Path, support_split: str = "train",
            images_split: str = "test", overrides: list[str] | None = None, overwrite: bool = False) -> Path:
    from accelerate import Accelerator

    if out.exists() and not overwrite:  # every rank refuses alike, before any work
        raise FsctError(f"{out}: exists (pass --overwrite to replace it)")
    acc = Accelerator()
    with locked(out, "submission", enabled=acc.is_main_process):
        _predict_locked(acc, checkpoint, support, images, out, support_split, images_split, overrides)
    # The process group is torn down before exit: on several machines a rank that exits with gloo's threads
    # alive aborts, and its node's agent then never reaches the rendezvous's exit barrier.
    acc.end_training()
    return out


def fingerprint(checkpoint_weights: Path, cfg: Config, support: Path, support_split: str, images: Path,
                images_split: str, world: int) -> str:
    """What a part depends on: the weights' bytes, the resolved config (predict settings included), the
    support set and the test slices (their index or file listing), and how slices are split over ranks."""
    h = hashlib.sha256()
    with open(checkpoint_weights, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    h.update(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    for folder, split in ((support, support_split), (images, images_split)):
        h.update(f"|{split}|".encode())
        index = folder / "index.json"
        if index.is_file():
            h.update(index.read_bytes())
        else:
            for p in list_images(folder):
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"|world={world}".encode())
    return h.hexdigest()


def _predict_locked(acc, checkpoint: Path, support: Path, images: Path, out: Path, support_split: str,
                    images_split: str, overrides: list[str] | None) -> None:
    rank, world, dev = acc.process_index, acc.num_processes, acc.device
    model, cfg = load_model(checkpoint, overrides)
    pcfg = cfg.predict
    model.to(dev)
    fp = fingerprint(weights_path(checkpoint), cfg, support, support_split, images, images_split, world)
    if acc.is_main_process:
        _prepare_parts(out, fp)
    acc.wait_for_everyone()
    queries = query_source(images, images_split, rank, world)
    part = part_path(out, rank, world)
    if _part_done(part, queries.keys, fp):
        acc.print(f"rank {rank}: {part} already complete, skipped", flush=True)
    else:
        learned = model_draws_partition(pcfg)
        if learned and not model.dense_head:
            raise FsctError(f"{checkpoint}: predict.partition_split={pcfg.partition_split} needs a model "
                            "trained with model.decoder=unet")
        refine = protos = voters = None
        if learned and vote_on(pcfg):
            with acc.autocast():  # the embeddings of the support as those of the queries below
                voters = shard_voters(model, support, support_split, pcfg, cfg.data.image_size)
        if not learned:  # the learned partition needs no class prototypes: its borders come from the model
            pool = load_split(support, support_split, size=cfg.data.image_size)
            protos = support_prototypes(model, pool, pcfg, dev)
            protos.protos = protos.protos.to(dev)
        if pcfg.mode == "partition" and not learned:
            from fsct.partition import partition_slice as refine
        masks = []
        with acc.autocast():
            for ks in track(list(_batched(queries.keys, pcfg.batch_size)), desc=f"predict rank {rank}",
                            enabled=acc.is_local_main_process):
                imgs = queries.load(ks)
                if learned:
                    masks.append(learned_masks(model, torch.from_numpy(imgs).to(dev), pcfg, cfg.data.image_size,
                                               voters))
                    continue
                labels, logits, feats = predict_batch(model, protos, torch.from_numpy(imgs).to(dev), pcfg,
                                                      cfg.data.image_size)
                if refine is not None:
                    labels = np.stack([refine(labels[b], logits[b].float(), feats[b], imgs[b], protos.class_ids,
                                              pcfg) for b in range(len(ks))])
                masks.append(labels)
        arr = np.concatenate(masks) if masks else np.zeros((0, OUT_SIZE, OUT_SIZE), np.uint8)
        try:
            with atomic_file(part) as tmp:
                fault_point("predict:write-part")
                with open(tmp, "wb") as f:
                    np.savez(f, keys=np.array(queries.keys, dtype=str), masks=arr, fingerprint=np.array(fp))
        except OSError as e:
            raise FsctError(f"{part}: cannot write this rank's part ({e.strerror or e})") from e
        fault_point("predict:part")
    acc.wait_for_everyone()
    if acc.is_main_process:
        merge_parts(out, world, fp)
    acc.wait_for_everyone()


def _prepare_parts(out: Path, fp: str) -> None:
    """Under the lock (rank 0): drop temporaries of killed runs, and parts made by another checkpoint,
    config, support or test set (they would be wrong, and on a full disk they take the room)."""
    remove_stale(out)
    remove_stale(out.parent / f"{out.name}.keys.json")
    parts = parts_dir(out)
    stamp = parts / "FINGERPRINT"
    if parts.exists() and not (stamp.is_file() and stamp.read_text().strip() == fp):
        print(f"{parts}: parts of another checkpoint or setting, discarded", flush=True)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        with atomic_file(stamp) as t:
            t.write_text(fp + "\n")


def _part_done(part: Path, keys: list[str], fp: str) -> bool:
    if not part.is_file():
        return False
    try:
        with np.load(part) as z:
            return (str(z["fingerprint"]) == fp and z["keys"].tolist() == keys
                    and z["masks"].shape[0] == len(keys))
    except (OSError, ValueError, KeyError):
        return False  # a corrupt part, or one without a fingerprint, is recomputed


def merge_parts(out: Path, world: int, fp: str) -> None:
    keys, masks = [], []
    for r in range(world):
        with np.load(part_path(out, r, world)) as z:
            if str(z["fingerprint"]) != fp:  # belt and braces: never merge a part of another run
                raise FsctError(f"{part_path(out, r, world)}: made by another checkpoint or setting")
            keys += z["keys"].tolist()
            masks.append(z["masks"])
    order = sorted(range(len(keys)), key=lambda i: key_order(keys[i]))
    arr = np.concatenate(masks)[order]
    try:
        write_submission(out, arr)
        with atomic_file(out.parent / f"{out.name}.keys.json") as t:
            t.write_text(json.dumps([keys[i] for i in order]))
    except OSError as e:
        raise FsctError(f"{out}: cannot write the submission ({e.strerror or e}); the parts in "
                        f"{parts_dir(out)} are kept: re-run to retry the merge") from e
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    print(f"{out}: {len(keys)} slices", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="run dir (or its best/) with model.safetensors")
    p.add_argument("--support", type=Path, required=True, help="shard folder with the labelled support split")
    p.add_argument("--support-split", default="train")
    p.add_argument("--images", type=Path, required=True, help="shard folder (test split) or folder of PNGs")
    p.add_argument("--images-split", default="test")
    p.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. predict.tta_flip=true")


def run(args: argparse.Namespace) -> int:
    keep_freed_memory()
    predict(args.checkpoint, args.support, args.images, args.out, args.support_split, args.images_split,
            args.overrides, args.overwrite)
    return 0

"""A training run's output dir: what is in it, whether a new `fsct train` may write there, and the small
records that must survive a crash (its checkpoints: fsct.checkpoint)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import zlib
from pathlib import Path

from fsct.atomic import atomic_file, remove_stale
from fsct.checkpoint import checkpoints, clear_partial
from fsct.errors import FsctError

# What `fsct train` writes into its output dir (and what --overwrite removes; nothing else is touched).
RUN_FILES = ("checkpoints", "best", "model.safetensors", "config.yaml", "metrics.jsonl", "DONE", "PREEMPTED",
             "PREEMPT", "wandb_id.txt", "wandb")


def describe_run(out: Path) -> str | None:
    """'finished', 'unfinished (...)' or None when `out` holds no training a new run could destroy."""
    if (out / "DONE").is_file():
        return "finished run"
    ckpts = checkpoints(out)
    if ckpts:
        return f"unfinished run (newest checkpoint {ckpts[-1].name})"
    if (out / "model.safetensors").is_file():
        return "run with a model"
    return None


def prepare_run_dir(out: Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """Refuse to train into a dir that holds a run unless asked to continue it (--resume) or replace it
    (--overwrite). Read-only on every rank but the main one, which clears the old run for --overwrite."""
    if resume and overwrite:
        raise FsctError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    found = describe_run(out)
    if found is not None and not resume and not overwrite:
        raise FsctError(f"{out}: holds a {found}; pass --resume auto to continue it or --overwrite to "
                        "replace it (or choose another train.output_dir)")
    if not main:
        return
    if overwrite:
        for name in (*RUN_FILES, *(p.name for p in out.glob("rank*.json"))):
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    clear_partial(out)  # checkpoints a killed run did not finish
    for name in ("metrics.jsonl", "wandb_id.txt"):  # atomic rewrites a kill interrupted
        remove_stale(out / name)


def write_text(path: Path, text: str) -> None:
    """A small state file, replaced whole: a reader never sees half of it."""
    with atomic_file(path) as t:
        t.write_text(text)


def write_json(path: Path, value: object) -> None:
    write_text(path, json.dumps(value))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (those a resume from `step` does not log again); atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the crash
        if row.get("step", 0) <= step:
            keep.append(line + "\n")
    with atomic_file(path) as t:
        t.write_text("".join(keep))


class EpisodeAudit:
    """What a rank trained on: a digest of every episode's slice keys, chained step by step so that a
    checkpoint can carry it and a resumed run ends with the digest an uninterrupted one would have, and which
    slices of the rank's share (`keys`) any episode has reached so far (one byte each)."""

    def __init__(self, digest: str = "", keys: list[str] | None = None, reached: bytes | None = None):
        self.digest = digest
        self._h = hashlib.sha256(digest.encode())
        self._pos = {k: i for i, k in enumerate(keys or [])}
        self.reached = bytearray(reached if reached is not None and len(reached) == len(self._pos)
                                 else len(self._pos))

    def update(self, keys: list[str]) -> None:
        """One episode's slices, support then query."""
        self._h.update(" ".join(keys).encode() + b";")
        for k in keys:
            i = self._pos.get(k)
            if i is not None:  # superpixel episodes draw from the unlabelled split, not the share
                self.reached[i] = 1

    def end_step(self) -> None:
        self.digest = self._h.hexdigest()
        self._h = hashlib.sha256(self.digest.encode())

    def unreached(self) -> list[str]:
        keys = list(self._pos)
        return [keys[i] for i, r in enumerate(self.reached) if not r]

    @staticmethod
    def path(ckpt: Path, rank: int) -> Path:
        return ckpt / f"audit_rank{rank}.json"

    def save(self, ckpt: Path, rank: int, step: int) -> None:
        reached = base64.b64encode(zlib.compress(bytes(self.reached))).decode()
        write_json(self.path(ckpt, rank), {"step": step, "episodes_digest": self.digest, "reached": reached})

    @classmethod
    def load(cls, ckpt: Path | None, rank: int, keys: list[str] | None = None) -> EpisodeAudit:
        if ckpt is None or not cls.path(ckpt, rank).is_file():
            return cls(keys=keys)
        saved = json.loads(cls.path(ckpt, rank).read_text())
        reached = zlib.decompress(base64.b64decode(saved["reached"])) if "reached" in saved else None
        return cls(saved["episodes_digest"], keys, reached)

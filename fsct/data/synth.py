"""`fsct synth`: seeded synthetic axial CT in the challenge's exact layout.

Every slice is drawn from its own generator, `np.random.default_rng([seed, split_id, i])`, so the output
is byte-identical for a seed whatever the number of worker processes. The slices come from
fsct.data.anatomy; this module decides which are labelled, drops and renumbers annotations, and writes the
files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from io import BytesIO
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from fsct.atomic import atomic_dir, atomic_file
from fsct.data.anatomy import N_CLASSES, SIZE, STRUCTURES, TEST_ONLY_IDS, generate_slice
from fsct.data.challenge import write_labels
from fsct.errors import FsctError
from fsct.progress import track
from fsct.viz import grid, overlay

SPLIT_IDS = {"train": 0, "test": 1}

PRESETS: dict[str, dict[str, float]] = {
    # demo: half the train slices labelled so that class episodes have enough support on a small set.
    "demo": {"n_train": 200, "n_test": 50, "labelled_fraction": 0.5},
    "challenge": {"n_train": 2000, "n_test": 500, "labelled_fraction": 0.2},
}


@dataclass(frozen=True)
class SynthSettings:
    seed: int = 0
    n_train: int = 200
    n_test: int = 50
    labelled_fraction: float = 0.5
    ids: str = "semantic"  # semantic | per-slice (ids renumbered at random on every slice)
    unannotated_prob: float = 0.1  # a visible structure is left out of a labelled train mask
    lesion_prob: float = 0.5  # a test slice whose host organ is visible gets that lesion
    preset: str = "demo"

    def labelled(self) -> np.ndarray:
        """Boolean per train slice: exactly round(fraction * n_train) of them, at random positions."""
        n_lab = int(round(self.labelled_fraction * self.n_train))
        flags = np.zeros(self.n_train, bool)
        flags[np.random.default_rng([self.seed, 2]).permutation(self.n_train)[:n_lab]] = True
        return flags


@dataclass
class Sample:
    image: np.ndarray  # (512, 512) uint8
    mask: np.ndarray  # (512, 512) uint8, as written to the CSV (annotation dropped, ids renumbered)
    truth: np.ndarray  # (512, 512) uint8 semantic ids, every structure drawn
    level: float  # 0 = upper thorax .. 1 = hips
    labelled: bool
    classes: list[int] = field(default_factory=list)  # semantic ids present in `mask`



def make_sample(settings: SynthSettings, split: str, index: int, labelled: bool | None = None) -> Sample:
    """Slice `index` of `split` exactly as `fsct synth` writes it (mask after annotation and renumbering)."""
    sid = SPLIT_IDS[split]
    rng = np.random.default_rng([settings.seed, sid, index])
    z = float(rng.uniform(0, 1))
    image, truth = generate_slice(rng, z, lesion_prob=settings.lesion_prob if split == "test" else 0.0)
    if split == "train":
        if labelled is None:
            labelled = bool(settings.labelled()[index])
        if labelled:
            present = np.unique(truth)[1:]
            drop_rng = np.random.default_rng([settings.seed, sid, index, 1])
            dropped = present[drop_rng.random(len(present)) < settings.unannotated_prob]
            mask = np.where(np.isin(truth, dropped), 0, truth).astype(np.uint8)
        else:
            mask = np.zeros_like(truth)
    else:
        labelled = True
        mask = truth.copy()
    classes = [int(x) for x in np.unique(mask)[1:]]
    if settings.ids == "per-slice" and classes:
        ids_rng = np.random.default_rng([settings.seed, sid, index, 2])
        lut = np.zeros(256, np.uint8)
        lut[classes] = ids_rng.choice(np.arange(1, N_CLASSES + 1), len(classes), replace=False)
        mask = lut[mask]
    return Sample(image, mask, truth, z, bool(labelled), classes)


# ---------------------------------------------------------------------------------------------------------
# Output files


def _png_bytes(image: np.ndarray) -> bytes:
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def contact_sheet(images: list[np.ndarray], masks: list[np.ndarray], titles: list[str], tile: int = 256
                  ) -> Image.Image:
    """Two slices per row, each as [image | mask overlaid in colour]."""
    tiles = [(img, overlay(img, m), title) for img, m, title in zip(images, masks, titles, strict=True)]
    rows = [tiles[i:i + 2] for i in range(0, len(tiles), 2)]
    return grid([[a for img, over, _ in r for a in (img, over)] for r in rows],
                [[t for _, _, title in r for t in (title, "")] for r in rows], tile)


def _generate(job: tuple[SynthSettings, str, int, bool]) -> tuple[bytes, np.ndarray, float, list[int]]:
    settings, split, i, labelled = job
    s = make_sample(settings, split, i, labelled)
    return _png_bytes(s.image), s.mask, s.level, s.classes


def write_synth(out: Path | str, settings: SynthSettings, overwrite: bool = False,
                contact_sheet_path: Path | str | None = None, workers: int = 1,
                progress: bool = True) -> Path:
    """Write the whole data set under `out` (atomically) and return `out`."""
    out = Path(out)
    if settings.ids not in ("semantic", "per-slice"):
        raise FsctError(f"{out}: --ids must be semantic or per-slice, not {settings.ids!r}")
    if not 0 <= settings.labelled_fraction <= 1:
        raise FsctError(f"{out}: --labelled-fraction must be in [0, 1], not {settings.labelled_fraction}")
    if not 0 <= settings.unannotated_prob <= 1:
        raise FsctError(f"{out}: --unannotated-prob must be in [0, 1], not {settings.unannotated_prob}")
    if settings.n_train < 1 or settings.n_test < 1:
        raise FsctError(f"{out}: --n-train and --n-test must be at least 1")
    flags = settings.labelled()
    slices: dict[str, list[dict]] = {}
    sheet_imgs: list[tuple[float, np.ndarray, np.ndarray, str]] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
        try:
            for split, n in (("train", settings.n_train), ("test", settings.n_test)):
                img_dir = tmp / f"X_{split}" / "images"
                img_dir.mkdir(parents=True)
                jobs = [(settings, split, i, bool(flags[i]) if split == "train" else True) for i in range(n)]
                results = pool.map(_generate, jobs, chunksize=4) if pool else map(_generate, jobs)
                masks = np.zeros((n, SIZE, SIZE), np.uint8)
                meta = []
                for i, (png, mask, level, classes) in enumerate(track(results, n, f"synth {split}",
                                                                      enabled=progress)):
                    (img_dir / f"{i}.png").write_bytes(png)
                    masks[i] = mask
                    meta.append({"name": f"{i}.png", "level": round(level, 4), "labelled": jobs[i][3],
                                 "classes": classes})
                    if split == "test" and len(sheet_imgs) < 64:
                        sheet_imgs.append((level, np.asarray(Image.open(BytesIO(png))), mask, f"test {i}"))
                write_labels(tmp / f"Y_{split}.csv", masks, [f"{i}.png" for i in range(n)])
                slices[split] = meta
        finally:
            if pool:
                pool.shutdown()
        # Six test slices spread over the levels (thorax .. pelvis).
        sheet_imgs.sort(key=lambda x: x[0])
        pick = sorted({round(q * (len(sheet_imgs) - 1)) for q in np.linspace(0, 1, 6)})
        chosen = [sheet_imgs[k] for k in pick]
        sheet = contact_sheet([x[1] for x in chosen], [x[2] for x in chosen],
                              [f"{x[3]}  level {x[0]:.2f}" for x in chosen])
        sheet.save(tmp / "contact_sheet.png")
        info = {
            "version": 1,
            "settings": asdict(settings),
            "ids": settings.ids,
            "ids_note": "semantic: CSV ids are the class ids below; per-slice: each slice's ids are a random "
                        "renumbering of them (same partition)",
            "classes": [{"id": s.id, "name": s.name, "test_only": s.test_only} for s in STRUCTURES],
            "test_only": list(TEST_ONLY_IDS),
            "levels": "0 = upper thorax, 0.3 upper abdomen, 0.55 lower abdomen, 0.8 pelvis, 1 = hips",
            "slices": slices,
        }
        (tmp / "synth.json").write_text(json.dumps(info, indent=1))
    if contact_sheet_path is not None:
        with atomic_file(contact_sheet_path) as t:
            shutil.copyfile(out / "contact_sheet.png", t)
    return out


# ---------------------------------------------------------------------------------------------------------
# Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (X_train/, Y_train.csv, X_test/, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="demo: 200 train (50%% labelled), 50 test; challenge: 2000 train (20%% "
                             "labelled, i.e. 400), 500 test. Explicit options override it.")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--labelled-fraction", type=float, default=None,
                        help="fraction of train slices with a mask; the rest get empty columns")
    parser.add_argument("--ids", choices=("semantic", "per-slice"), default="semantic",
                        help="per-slice: ids renumbered at random on every slice, as in the real challenge")
    parser.add_argument("--unannotated-prob", type=float, default=0.1,
                        help="probability that a visible structure is left out of a labelled train mask")
    parser.add_argument("--lesion-prob", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--contact-sheet", default=None, help="also copy the contact sheet PNG here")


def settings_from_args(args: argparse.Namespace) -> SynthSettings:
    preset = PRESETS[args.preset]

    def pick(name: str) -> float:
        v = getattr(args, name)
        return preset[name] if v is None else v

    return SynthSettings(seed=args.seed, n_train=int(pick("n_train")), n_test=int(pick("n_test")),
                         labelled_fraction=float(pick("labelled_fraction")), ids=args.ids,
                         unannotated_prob=args.unannotated_prob, lesion_prob=args.lesion_prob,
                         preset=args.preset)


def run(args: argparse.Namespace) -> int | None:
    settings = settings_from_args(args)
    out = write_synth(args.out, settings, overwrite=args.overwrite, contact_sheet_path=args.contact_sheet,
                      workers=max(1, args.workers))
    print(f"wrote {out}: {settings.n_train} train ({int(settings.labelled().sum())} labelled), "
          f"{settings.n_test} test, {N_CLASSES} classes ({len(TEST_ONLY_IDS)} test-only)")
    return 0

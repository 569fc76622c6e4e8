"""Same budget, two systems: (a) class-mode PANet + class-mode predict (the notebook's way) vs (b) slice +
superpixel episodes + partition predict; cross rows (a model + b predict, b model + a predict) separate
what training and inference each bring. Every step is a `python -m fsct ...` subprocess, printed as run.

  python tools/compare_modes.py realct --src ../shared/data/realct-mini --out WORK/realct [--renumber-train]
      writes a challenge-layout set from realct-mini: train = labelled 0..n_train-1 + the unlabelled
      slices, test = the other labelled slices (as X_test/images/0..m-1.png) with ids renumbered per slice;
      [--test-first] tests on the first block instead, [--drop 56.png ...] leaves slices out
  python tools/compare_modes.py run --data DIR --work WORK [--steps 500 --image-size 128 ...]
      DIR in the challenge layout with a Y_test.csv (e.g. from `fsct synth` or the command above);
      writes WORK/results.json and prints a markdown table of the official score
  python tools/compare_modes.py sweep --data DIR --work WORK --run a|b key=value,key=value ...
      partition variants (one predict per comma-separated override set) with a trained run of WORK;
      appends to WORK/sweep.json

Runs are reused when WORK already holds them (delete a run folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from fsct.data.challenge import list_images, read_labels, write_labels
from fsct.errors import FsctError

FSCT = [sys.executable, "-m", "fsct"]
SYSTEMS = {
    # name: (training overrides, predict overrides)
    "a": (["episodes.mode=class"], ["predict.mode=class"]),
    "b": (["episodes.mix={slice: 0.5, superpixel: 0.5}"], ["predict.mode=partition", "predict.partition_split=group"]),
}


def sh(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def renumber(mask: np.ndarray, rng: np.random.Generator, n_ids: int) -> np.ndarray:
    """The same partition under random per-slice ids drawn from 1..n_ids (the challenge's convention)."""
    present = np.unique(mask)[1:]
    lut = np.zeros(256, np.uint8)
    lut[present] = rng.choice(np.arange(1, max(n_ids, len(present)) + 1), len(present), replace=False)
    return lut[mask]


def make_realct(src: Path, out: Path, n_train: int, renumber_train: bool, seed: int,
                test_first: bool = False, drop: tuple[str, ...] = ()) -> None:
    paths = list_images(src / "X_train")
    cols, masks = read_labels(src / "Y_train.csv", [p.name for p in paths])
    missing = sorted(set(drop) - {p.name for p in paths})
    if missing:
        raise FsctError(f"{src / 'X_train'}: no slice named {', '.join(missing)} to drop")
    paths = [p for p in paths if p.name not in drop]
    by_name = dict(zip(cols, masks, strict=True))
    labelled = [p for p in paths if by_name.get(p.name) is not None and by_name[p.name].any()]
    unlabelled = [p for p in paths if p not in labelled]
    train, test = labelled[:n_train], labelled[n_train:]
    if test_first:  # the other end of the body: test on the first block, train on the rest
        n_test = len(labelled) - n_train
        train, test = labelled[n_test:], labelled[:n_test]
    n_ids = len(np.unique(np.concatenate([np.unique(by_name[p.name]) for p in labelled]))) - 1
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "X_train" / "images").mkdir(parents=True)
    (out / "X_test" / "images").mkdir(parents=True)
    train_masks, train_cols = [], []
    for p in train + unlabelled:
        shutil.copyfile(p, out / "X_train" / "images" / p.name)
        m = by_name.get(p.name, np.zeros((512, 512), np.uint8))
        train_masks.append(renumber(m, rng, n_ids) if renumber_train and m.any() else m)
        train_cols.append(p.name)
    write_labels(out / "Y_train.csv", np.stack(train_masks), train_cols)
    test_masks = []
    for i, p in enumerate(test):
        shutil.copyfile(p, out / "X_test" / "images" / f"{i}.png")
        test_masks.append(renumber(by_name[p.name], rng, n_ids))
    write_labels(out / "Y_test.csv", np.stack(test_masks), [f"{i}.png" for i in range(len(test))])
    # The same masks with the source's class ids, for per-structure views (tools/structure_view.py), never scored.
    write_labels(out / "Y_test_classes.csv", np.stack([by_name[p.name] for p in test]),
                 [f"{i}.png" for i in range(len(test))])
    (out / "README.md").write_text(
        f"Built by tools/compare_modes.py from {src}: train = {[p.name for p in train]} (labelled"
        f"{', ids renumbered per slice' if renumber_train else ', original ids'}) + {len(unlabelled)} unlabelled; "
        f"test = {[p.name for p in test]} as 0..{len(test) - 1}.png, ids renumbered per slice (seed {seed}); "
        f"Y_test_classes.csv: the same test masks with the source's ids.\n")
    print(f"{out}: {len(train)} labelled + {len(unlabelled)} unlabelled train slices, {len(test)} test slices")


def score(pred: Path, truth: Path, env: dict[str, str]) -> dict:
    out = pred.with_suffix(".score.json")
    if not out.is_file():
        sh(FSCT + ["score", "--pred", str(pred), "--truth", str(truth), "--json", str(out)], env)
    return json.loads(out.read_text())


def run_comparison(args: argparse.Namespace) -> dict:
    data, work = args.data, args.work
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    shards = work / "shards"
    if not (shards / "index.json").is_file():
        sh(FSCT + ["shard", "--images", str(data / "X_train"), "--labels", str(data / "Y_train.csv"),
                   "--out", str(shards), "--val-fraction", "0", "--superpixels", "--workers", "1"], env)
        sh(FSCT + ["shard", "--images", str(data / "X_test"), "--out", str(shards), "--split", "test",
                   "--workers", "1"], env)
    budget = [f"data.shards={shards}", f"train.max_steps={args.steps}", f"data.image_size={args.image_size}",
              f"model.feature_dim={args.feature_dim}", f"episodes.n_way={args.n_way}",
              f"episodes.k_shot={args.k_shot}", f"episodes.n_query={args.n_query}", f"train.seed={args.seed}",
              "train.val_every=0", "train.save_every=0", "train.log_every=50", "optim.warmup_steps=50",
              "data.cache_on_device=false"]
    results: dict = {"data": str(data), "budget": budget, "rows": {}}
    for model_sys in SYSTEMS:
        run = work / f"run_{model_sys}"
        if not (run / "DONE").is_file():
            sh(FSCT + ["train", "--resume", "auto", f"train.output_dir={run}"] + budget + SYSTEMS[model_sys][0], env)
        for pred_sys in SYSTEMS:
            pred = work / f"pred_{model_sys}{pred_sys}.csv"
            if not pred.is_file():
                sh(FSCT + ["predict", "--checkpoint", str(run), "--support", str(shards), "--images", str(shards),
                           "--out", str(pred)] + SYSTEMS[pred_sys][1] + args.predict_overrides, env)
            s = score(pred, data / "Y_test.csv", env)
            results["rows"][f"{model_sys}{pred_sys}"] = {"official": s["official"]["mean"],
                                                         "official_std": s["official"]["std"],
                                                         "ari_all": s["ari_all"]["mean"]}
    rows = results["rows"]
    results["ratio_b_over_a"] = rows["bb"]["official"] / max(rows["aa"]["official"], 1e-9)
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    label = {"a": "class episodes", "b": "slice+superpixel episodes"}
    plabel = {"a": "class predict", "b": "partition predict"}
    print("\n| training | prediction | official (mean ± std) | ARI all pixels |\n|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {label[k[0]]} | {plabel[k[1]]} | {v['official']:.4f} ± {v['official_std']:.4f} "
              f"| {v['ari_all']:.4f} |")
    print(f"\n(b)/(a) official: {results['ratio_b_over_a']:.2f}x")
    return results


def sweep(args: argparse.Namespace) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    shards, run = args.work / "shards", args.work / f"run_{args.run}"
    path = args.work / "sweep.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for variant in args.variants:
        overrides = ["predict.mode=partition"] + [v for v in variant.split(",") if v]
        name = f"{args.run}:" + ",".join(overrides[1:])
        pred = args.work / f"sweep_{args.run}_{len(done)}.csv"
        if name not in done:
            pred.with_suffix(".score.json").unlink(missing_ok=True)  # a stale score of an earlier variant
            sh(FSCT + ["predict", "--checkpoint", str(run), "--support", str(shards), "--images", str(shards),
                       "--out", str(pred)] + overrides, env)
            done[name] = score(pred, args.data / "Y_test.csv", env)["official"]["mean"]
            path.write_text(json.dumps(done, indent=1) + "\n")
        print(f"| {name} | {done[name]:.4f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("realct", help="build a train/test split of realct-mini in the challenge layout")
    r.add_argument("--src", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--n-train", type=int, default=20, help="labelled slices for train; the rest are test")
    r.add_argument("--renumber-train", action="store_true", help="also renumber train ids per slice")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--test-first", action="store_true", help="test on the first labelled slices, not the last")
    r.add_argument("--drop", nargs="+", default=[], metavar="NAME",
                   help="leave these slices out (e.g. unlabelled slices of the test block's body levels)")
    c = sub.add_parser("run", help="train both systems with one budget, predict, score")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--steps", type=int, default=500)
    c.add_argument("--image-size", type=int, default=128)
    c.add_argument("--feature-dim", type=int, default=64)
    c.add_argument("--n-way", type=int, default=3)
    c.add_argument("--k-shot", type=int, default=1)
    c.add_argument("--n-query", type=int, default=1)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("predict_overrides", nargs="*", default=[], help="extra key=value for every predict")
    w = sub.add_parser("sweep", help="partition variants with a trained run")
    w.add_argument("--data", type=Path, required=True)
    w.add_argument("--work", type=Path, required=True)
    w.add_argument("--run", choices=sorted(SYSTEMS), default="b")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("variants", nargs="+", help="comma-separated predict overrides per variant")
    args = p.parse_args(argv)
    if args.cmd == "sweep":
        sweep(args)
    elif args.cmd == "realct":
        make_realct(args.src, args.out, args.n_train, args.renumber_train, args.seed, args.test_first,
                    tuple(args.drop))
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        run_comparison(args)


if __name__ == "__main__":
    try:
        main()
    except FsctError as e:
        sys.exit(f"error: {e}")

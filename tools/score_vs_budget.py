"""The official score against training steps, for several systems on one data set, beside the no-model
baselines. Every step is a `python -m fsct ...` subprocess, printed as it runs.

  python tools/score_vs_budget.py --data DIR --work WORK [--config configs/partition_cpu.yaml]
      [--steps 150 300 600] [--system NAME "key=value ..."]... [--pretrained FILE] [--wandb]

DIR is in the challenge layout with a Y_test.csv (`fsct synth ...`, or `tools/compare_modes.py realct`).
Each system trains ONCE to the largest step count (`train.save_every` = the smallest, every checkpoint
kept) and every checkpoint is predicted and scored: one learning curve per system. The baselines need no
model: "superpixels alone" (the body's Felzenszwalb superpixels as the partition) and "oracle merge"
(every superpixel given its majority true id: the best any merge of them can do).

Writes WORK/budget.json, a markdown table on stdout, and --plot (PNG). With --wandb, the curves go to
one W&B run too (`WANDB_MODE=offline` works: sync later). Runs are reused when WORK holds them.
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

from fsct.data.challenge import list_images, read_image, read_labels
from fsct.data.superpixels import body_mask, superpixels
from fsct.ema import FILE as EMA_FILE
from fsct.metrics import official_score_slice
from fsct.viz import line_chart

FSCT = [sys.executable, "-m", "fsct"]
REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})


def default_systems(pretrained: str | None) -> dict[str, list[str]]:
    """The recipe's model with ImageNet weights and from scratch, and today's PANet (no decoder, `group`
    split); the split is named, not the config's, so a name says what was scored. --pretrained names the
    weights for the first; without it the config's own `model.pretrained` is used."""
    weights = [f"model.pretrained={pretrained}"] if pretrained else []
    boundary = ["model.encoder=efficientnet_lite0", "predict.partition_split=boundary"]
    return {
        "lite0 ImageNet + unet (boundary)": [*boundary, *weights],
        "lite0 scratch + unet (boundary)": [*boundary, "model.pretrained="],
        "resnet18 scratch, no decoder (group)": ["model.encoder=resnet18", "model.pretrained=", "model.decoder=none",
                                                 "train.best_metric=val/miou", "predict.partition_split=group"],
    }


def baselines(data: Path) -> dict[str, float]:
    """superpixels alone and their oracle merge, official score on the test slices."""
    paths = list_images(data / "X_test" / "images")
    _, truth = read_labels(data / "Y_test.csv", [p.name for p in paths])
    alone, oracle = [], []
    for p, t in zip(paths, truth, strict=True):
        image = read_image(p)
        sp = superpixels(image).astype(np.int64)
        sp = np.where(body_mask(image) & (sp == 0), int(sp.max()) + 1, sp)
        votes = np.zeros((int(sp.max()) + 1, 256), np.int64)
        np.add.at(votes, (sp.ravel(), t.ravel().astype(np.int64)), 1)
        alone.append(official_score_slice(t, sp))
        oracle.append(official_score_slice(t, votes.argmax(1)[sp]))
    return {"superpixels alone": float(np.mean(alone)), "oracle merge of superpixels": float(np.mean(oracle))}


def shard(data: Path, shards: Path) -> None:
    if (shards / "index.json").is_file():
        return
    sh([*FSCT, "shard", "--images", str(data / "X_train" / "images"), "--labels", str(data / "Y_train.csv"),
        "--out", str(shards), "--superpixels"])
    sh([*FSCT, "shard", "--images", str(data / "X_test" / "images"), "--out", str(shards), "--split", "test"])


def curve(name: str, overrides: list[str], a: argparse.Namespace, shards: Path) -> list[tuple[int, float]]:
    run = a.work / slug(name)
    if not (run / "DONE").is_file():
        shutil.rmtree(run, ignore_errors=True)
        sh([*FSCT, "train", "--config", str(a.config), f"data.shards={shards}", f"train.output_dir={run}",
            f"train.max_steps={max(a.steps)}", f"train.save_every={min(a.steps)}", "train.keep_checkpoints=1000",
            # val at every scored checkpoint, so each is predicted with the threshold val chose at that step
            f"train.val_every={min(a.steps)}",
            *overrides])
    points = []
    for step in a.steps:
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        model = run / "eval" / f"step_{step}"
        score_file = model / "score.json"
        if not score_file.is_file():
            model.mkdir(parents=True, exist_ok=True)
            # a run with train.ema_decay validates and ships the weight average: score that
            weights = ckpt / EMA_FILE if (ckpt / EMA_FILE).is_file() else ckpt / "model.safetensors"
            shutil.copyfile(weights, model / "model.safetensors")
            shutil.copyfile(run / "config.yaml", model / "config.yaml")
            sub = model / "submission.csv"
            sub.unlink(missing_ok=True)
            sh([*FSCT, "predict", "--checkpoint", str(model), "--support", str(shards), "--images", str(shards),
                "--out", str(sub), *[o for o in overrides if o.startswith("predict.")], *val_threshold(run, step)])
            sh([*FSCT, "score", "--pred", str(sub), "--truth", str(a.data / "Y_test.csv"), "--json", str(score_file)])
        points.append((step, json.loads(score_file.read_text())["official"]["mean"]))
    return points


def val_threshold(run: Path, step: int) -> list[str]:
    """The boundary threshold the run chose on val at this step (what its model saved at that step would
    carry), as a predict override; none when the run did not choose one."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    chosen = [r["val/boundary_threshold"] for r in rows if r.get("step") == step and "val/boundary_threshold" in r]
    return [f"predict.boundary_threshold={chosen[-1]}"] if chosen else []


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "partition_cpu.yaml")
    p.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600])
    p.add_argument("--system", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                   help="a system: its name and its key=value overrides (repeatable; default: the built-in set)")
    p.add_argument("--pretrained", help="weights file for the pretrained system (tools/pretrained_weights.py)")
    p.add_argument("--plot", type=Path, help="PNG of the curves")
    p.add_argument("--title", default="official score vs training steps")
    p.add_argument("--wandb", action="store_true", help="log the curves to a W&B run")
    a = p.parse_args()
    a.steps = sorted(a.steps)
    a.work.mkdir(parents=True, exist_ok=True)
    shards = a.work / "shards"
    shard(a.data, shards)
    systems = {n: shlex.split(o) for n, o in a.system} if a.system else default_systems(a.pretrained)
    results = {"data": str(a.data), "config": str(a.config), "steps": a.steps, "baselines": baselines(a.data),
               "systems": {n: curve(n, o, a, shards) for n, o in systems.items()},
               "overrides": systems}
    (a.work / "budget.json").write_text(json.dumps(results, indent=1))
    print("\n| system | " + " | ".join(f"{s} steps" for s in a.steps) + " |")
    print("|---|" + "---|" * len(a.steps))
    for n, pts in results["systems"].items():
        print(f"| {n} | " + " | ".join(f"{v:.4f}" for _, v in pts) + " |")
    for n, v in results["baselines"].items():
        print(f"| {n} (no model) | " + " | ".join(f"{v:.4f}" for _ in a.steps) + " |")
    if a.plot:
        line_chart(results["systems"], a.title, "training steps", "official score",
                   hlines=results["baselines"]).save(a.plot)
        print(f"plot: {a.plot}")
    if a.wandb:
        import wandb

        # the same default as the training runs (sh): offline unless WANDB_MODE says otherwise
        run = wandb.init(project="fsct", job_type="score-vs-budget", config=results | {"systems": list(systems)},
                         dir=str(a.work), mode=os.environ.get("WANDB_MODE", "offline"))
        for i, step in enumerate(a.steps):
            run.log({f"test/official/{n}": pts[i][1] for n, pts in results["systems"].items()}
                    | {f"test/official/{n}": v for n, v in results["baselines"].items()}, step=step)
        run.finish()


if __name__ == "__main__":
    main()

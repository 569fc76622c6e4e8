"""`make demo`: the whole job on embedded synthetic data, exactly as a user would type it.

synth -> shard (train/val/unlabeled with superpixels, test) -> train (configs/partition_cpu.yaml, the
recommended recipe, at a demo budget) -> predict (the recipe's own setting: the learned partition) ->
validate -> score, then a PNG of test slices from four body levels (image / truth / prediction) and the
run's validation curve. Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sh(*args: str) -> None:
    cmd = [sys.executable, "-m", "fsct", *args]
    print(f"\n$ fsct {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"demo: `fsct {args[0]}` failed (exit {r.returncode})")
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


def spread_over_levels(data: Path, n: int) -> list[int]:
    """Indices of n test slices spread from thorax to hips (synth.json records each slice's level), so the
    picture shows different anatomy rather than n near-identical slices."""
    slices = json.loads((data / "synth.json").read_text())["slices"]["test"]
    by_level = sorted(range(len(slices)), key=lambda i: slices[i]["level"])
    return [by_level[round(q * (len(by_level) - 1))] for q in np.linspace(0, 1, n)]


def panel(out: Path, data: Path, submission: Path, n: int = 4) -> Path:
    """n test slices spread over the body's levels (the synthetic test set runs head to feet)."""
    from PIL import Image

    from fsct.data.challenge import list_images, read_labels
    from fsct.submission import read_submission
    from fsct.viz import grid, overlay

    images = list_images(data / "X_test" / "images")
    _, truth = read_labels(data / "Y_test.csv")
    _, pred = read_submission(submission)
    levels = {s["name"]: s["level"] for s in json.loads((data / "synth.json").read_text())["slices"]["test"]}
    rows, titles = [], []
    for i in spread_over_levels(data, n):
        img = np.asarray(Image.open(images[i]))
        rows.append([img, overlay(img, truth[i]), overlay(img, pred[i])])
        titles.append([f"test {images[i].stem} (level {levels[images[i].name]:.2f})", "truth", "prediction"])
    path = out / "predictions.png"
    grid(rows, titles).save(path)
    return path


def curve(out: Path, run: Path, keys: tuple[str, ...] = ("val/ari_fg", "val/miou")) -> Path:
    """metrics.jsonl -> the validation curves of the run (the official score of the partition first)."""
    from fsct.viz import line_chart

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    path = out / "training_curve.png"
    line_chart({k: v for k, v in series.items() if v}, "demo run: validation", "step", "score").save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--config", default="configs/partition_cpu.yaml")
    p.add_argument("--steps", type=int, default=300, help="training steps (the recipe's own: 600)")
    p.add_argument("overrides", nargs="*", help="extra key=value for fsct train")
    a = p.parse_args()
    out = a.out if a.out.is_absolute() else REPO / a.out
    data, shards, run = out / "data", out / "shards", out / "run"
    t0 = time.perf_counter()
    sh("synth", "--out", str(data), "--preset", "demo", "--overwrite")
    sh("shard", "--images", str(data / "X_train" / "images"), "--labels", str(data / "Y_train.csv"),
       "--out", str(shards), "--superpixels", "--overwrite")
    sh("shard", "--images", str(data / "X_test" / "images"), "--out", str(shards), "--split", "test", "--overwrite")
    sh("shard", "--verify", str(shards))
    shutil.rmtree(run, ignore_errors=True)  # a demo starts fresh; real runs use --resume auto
    sh("train", "--config", a.config, f"data.shards={shards}", f"train.output_dir={run}",
       f"train.max_steps={a.steps}", *a.overrides)
    submission = out / "submission.csv"
    # predict settings (mode, partition_split, ...) come from the checkpoint's config.yaml, i.e. from --config
    sh("predict", "--checkpoint", str(run / "best" if (run / "best").is_dir() else run), "--support", str(shards),
       "--images", str(shards), "--out", str(submission), "--overwrite")
    sh("validate-submission", str(submission), "--images", str(data / "X_test" / "images"))
    sh("score", "--pred", str(submission), "--truth", str(data / "Y_test.csv"), "--json", str(out / "score.json"))
    picture = panel(out, data, submission)
    chart = curve(out, run)
    score = json.loads((out / "score.json").read_text())
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s")
    for what, path in [("synthetic data", data), ("contact sheet", data / "contact_sheet.png"),
                       ("shards", shards), ("run (config, checkpoints, model)", run),
                       ("submission", submission), ("score", out / "score.json"),
                       ("test slices: truth vs prediction", picture), ("training curve", chart)]:
        print(f"  {what:<34} {path}")
    print(f"  official score (ARI on truth foreground): {score['official']['mean']:.4f}"
          if isinstance(score.get("official"), dict) else "")


if __name__ == "__main__":
    main()

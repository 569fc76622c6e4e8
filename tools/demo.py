"""`make demo`: the whole job on embedded synthetic data, exactly as a user would type it.

synth -> shard (train/val/unlabeled, test) -> train (configs/demo.yaml) -> predict -> validate -> score,
then a PNG of test slices with predicted vs true masks. Every command is printed before it runs.
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


def panel(out: Path, data: Path, submission: Path, n: int = 4) -> Path:
    from PIL import Image

    from fsct.data.challenge import list_images, read_labels
    from fsct.submission import read_submission
    from fsct.viz import grid, overlay

    images = list_images(data / "X_test" / "images")[:n]
    _, truth = read_labels(data / "Y_test.csv")
    _, pred = read_submission(submission)
    rows = []
    for i, p in enumerate(images):
        img = np.asarray(Image.open(p))
        rows.append([img, overlay(img, truth[i]), overlay(img, pred[i])])
    titles = [[f"test {p.stem}", "truth", "prediction"] for p in images]
    path = out / "predictions.png"
    grid(rows, titles).save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="extra key=value for fsct train")
    a = p.parse_args()
    out = a.out if a.out.is_absolute() else REPO / a.out
    data, shards, run = out / "data", out / "shards", out / "run"
    t0 = time.perf_counter()
    sh("synth", "--out", str(data), "--preset", "demo", "--overwrite")
    sh("shard", "--images", str(data / "X_train" / "images"), "--labels", str(data / "Y_train.csv"),
       "--out", str(shards), "--overwrite")
    sh("shard", "--images", str(data / "X_test" / "images"), "--out", str(shards), "--split", "test", "--overwrite")
    sh("shard", "--verify", str(shards))
    shutil.rmtree(run, ignore_errors=True)  # a demo starts fresh; real runs use --resume auto
    sh("train", "--config", a.config, f"data.shards={shards}", f"train.output_dir={run}", *a.overrides)
    submission = out / "submission.csv"
    sh("predict", "--checkpoint", str(run / "best" if (run / "best").is_dir() else run), "--support", str(shards),
       "--images", str(shards), "--out", str(submission), "--overwrite")
    sh("validate-submission", str(submission), "--images", str(data / "X_test" / "images"))
    sh("score", "--pred", str(submission), "--truth", str(data / "Y_test.csv"), "--json", str(out / "score.json"))
    picture = panel(out, data, submission)
    score = json.loads((out / "score.json").read_text())
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s")
    for what, path in [("synthetic data", data), ("contact sheet", data / "contact_sheet.png"),
                       ("shards", shards), ("run (config, checkpoints, model)", run),
                       ("submission", submission), ("score", out / "score.json"),
                       ("test slices: truth vs prediction", picture)]:
        print(f"  {what:<34} {path}")
    print(f"  official score (ARI on truth foreground): {score['official']['mean']:.4f}"
          if isinstance(score.get("official"), dict) else "")


if __name__ == "__main__":
    main()

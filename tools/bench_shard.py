"""Full-size label file benchmark: `fsct shard` end to end, `read_labels` alone, and pandas' read_csv.

    .venv/bin/python tools/bench_shard.py --work DIR [--only shard,read_labels,pandas]

The first run writes, once, a challenge-sized data set under DIR (reused afterwards): `X_train/` with
2000 512x512 PNG slices and `Y_train.csv` (2000 columns 0.png..1999.png, index `Pixel 0..`, 400 labelled
columns of ~18 blobs and ~19 % foreground, 1600 all-zero columns; about 1.1 GB). Each measurement runs in
its own subprocess; prints one JSON object with wall time and peak RSS of each, and the ratios.
Memory: `peak_rss_mb` is the largest single process (wait4's ru_maxrss), `peak_tree_pss_mb` the largest
sum of PSS over the process and its children, sampled every 0.2 s (the shard command runs worker
processes); `peak_mb` the larger of the two, which the memory ratios use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_submission import blob_masks  # noqa: E402

N_SLICES, N_LABELLED = 2000, 400
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def make_dataset(work: Path, seed: int = 0) -> None:
    """Write DIR/X_train/*.png and DIR/Y_train.csv unless a previous run finished them."""
    done = work / ".complete"
    if done.exists():
        return
    from PIL import Image

    from fsct.data.challenge import write_labels

    rng = np.random.default_rng(seed)
    images = work / "X_train"
    images.mkdir(parents=True, exist_ok=True)
    labels = np.zeros((N_SLICES, 512, 512), np.uint8)
    yy, xx = np.mgrid[0:512, 0:512]
    body = ((yy - 256) / 210.0) ** 2 + ((xx - 256) / 240.0) ** 2 <= 1
    t0 = time.perf_counter()
    for i in range(N_SLICES):
        mask = blob_masks(1, rng)[0]
        if i < N_LABELLED:
            labels[i] = mask
        # A cheap CT-like slice: body, structures of their own brightness, noise.
        img = np.where(body, 90.0, 0.0) + (mask > 0) * (mask.astype(np.float64) % 7) * 15
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / f"{i}.png", compress_level=1)
        if (i + 1) % 500 == 0:
            took = time.perf_counter() - t0
            print(f"images: {i + 1}/{N_SLICES} ({took:.0f}s)", file=sys.stderr, flush=True)
    write_labels(work / "Y_train.csv", labels, [f"{i}.png" for i in range(N_SLICES)])
    print(f"labels: {work / 'Y_train.csv'} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    done.write_text("ok\n")


def _tree_memory_mb(root: int) -> float:
    """Memory of `root` and all its descendants, from /proc: proportional set size (shared pages, such
    as a forked worker's copy-on-write view of its parent, are split between the sharers, not counted
    twice), or resident size where smaps_rollup is missing."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(_process_memory_mb(p) for p in tree)


def _process_memory_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_MB
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(cmd: list[str], timeout: float) -> dict:
    """Run `cmd`; its wall time, exit code, peak RSS (its own rusage) and peak RSS of its process tree."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    log = tempfile.TemporaryFile()  # not a pipe: a chatty child must never block on a full pipe
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, _tree_memory_mb(proc.pid))
        if time.perf_counter() - t0 > timeout:
            proc.kill()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
    log.close()
    own = usage.ru_maxrss / 1024
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "rc": proc.returncode, "peak_rss_mb": round(own),
            "peak_tree_pss_mb": round(tree_peak), "peak_mb": round(max(own, tree_peak)), "output_tail": tail}


READ_LABELS = """
import sys, time
from fsct.data.challenge import read_labels
t = time.perf_counter()
cols, masks = read_labels(sys.argv[1], [f"{i}.png" for i in range(int(sys.argv[2]))])
print(f"read_labels {masks.shape} {masks.dtype} in {time.perf_counter() - t:.2f}s; "
      f"labelled columns: {int(masks.reshape(len(cols), -1).any(axis=1).sum())}")
"""

PANDAS = """
import sys, time
import pandas as pd
t = time.perf_counter()
frame = pd.read_csv(sys.argv[1], index_col=0)
print(f"pandas.read_csv {frame.shape} in {time.perf_counter() - t:.2f}s")
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the data set (cached) and the shards")
    p.add_argument("--only", default="shard,read_labels,pandas", help="comma-separated measurements to run")
    p.add_argument("--workers", type=int, default=None, help="passed to fsct shard --workers")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    args = p.parse_args()
    work = args.work.resolve()
    make_dataset(work)
    labels = work / "Y_train.csv"
    py = sys.executable
    commands = {
        "shard": [py, "-m", "fsct", "shard", "--images", str(work / "X_train"), "--labels", str(labels),
                  "--out", str(work / "shards"), "--overwrite"]
                 + (["--workers", str(args.workers)] if args.workers else []),
        "read_labels": [py, "-c", READ_LABELS, str(labels), str(N_SLICES)],
        "pandas": [py, "-c", PANDAS, str(labels)],
    }
    result: dict = {"label_file_mb": round(labels.stat().st_size / 1e6, 1), "cpus": os.cpu_count()}
    for name in [x.strip() for x in args.only.split(",") if x.strip()]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result[name] = measure(commands[name], args.timeout)
        print(f"{name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)
    if "pandas" in result:
        for name in ("shard", "read_labels"):
            if name in result and result[name]["rc"] == 0 and result["pandas"]["rc"] == 0:
                ours, theirs = result[name], result["pandas"]
                result[f"pandas_over_{name}_time"] = round(theirs["wall_s"] / ours["wall_s"], 2)
                result[f"pandas_over_{name}_memory"] = round(theirs["peak_mb"] / ours["peak_mb"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

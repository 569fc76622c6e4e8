"""Self-training experiment (docs/RESULTS.md, "Pseudo-labels from the model's own partition"): a train set of
a shard folder's train slices with their true masks plus unlabelled slices labelled by a model's learned
partition, in the challenge layout, for `fsct shard --split train --overwrite` into a copy of the shards.

  fsct predict --checkpoint M --support SHARDS --images SHARDS --images-split unlabeled --out P/pseudo.csv
  python docs/experiments/pseudo_labels.py --data DIR --shards SHARDS --pseudo P/pseudo.csv --out P

DIR is the challenge-layout set the shards were made from (DIR/X_train/images, DIR/Y_train.csv). A predicted
region that touches the image's edge becomes 0: air is background in the truth, not a structure.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from fsct.data.challenge import read_labels, write_labels
from fsct.submission import read_submission


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--pseudo", type=Path, required=True, help="fsct predict's CSV (its .keys.json beside it)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    train = sorted(json.loads((a.shards / "index.json").read_text())["splits"]["train"]["samples"])
    cols, masks = read_labels(a.data / "Y_train.csv")
    truth = dict(zip(cols, masks, strict=True))
    _, predicted = read_submission(a.pseudo)
    keys = json.loads(Path(f"{a.pseudo}.keys.json").read_text())  # sample keys in column order
    (a.out / "images").mkdir(parents=True, exist_ok=True)
    names, out, regions = [], [], []
    for key in train:
        names.append(f"{key}.png")
        out.append(truth[names[-1]])
    for key, m in zip(keys, predicted, strict=True):
        edge = np.unique(np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]]))
        out.append(np.where(np.isin(m, edge), 0, m).astype(np.uint8))
        names.append(f"{key}.png")
        regions.append(len(np.unique(out[-1])) - 1)
    for name in names:
        shutil.copyfile(a.data / "X_train" / "images" / name, a.out / "images" / name)
    write_labels(a.out / "Y.csv", np.stack(out), names)
    print(f"{len(train)} true + {len(keys)} pseudo-labelled slices; pseudo regions per slice "
          f"{min(regions)}-{max(regions)} (median {int(np.median(regions))})")


if __name__ == "__main__":
    main()

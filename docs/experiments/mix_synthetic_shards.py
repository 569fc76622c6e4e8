"""A copy of a shard set with labelled synthetic slices added to its train split; val, test and unlabelled untouched.

The first trial of synthetic anatomy in a small real train set (docs/RESULTS.md, "Synthetic slices in the
train split"), before `data.synthetic_slices` added them in memory. The first N labelled train slices (in key
order) of a synthetic shard set (`fsct synth --ids per-slice` then `fsct shard --superpixels`) go into one more
train tar, keys prefixed 'syn', listed in the copy's index.json:

    python docs/experiments/mix_synthetic_shards.py REAL_SHARDS SYNTH_SHARDS OUT 16
    fsct shard --verify OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fsct.data.pool import read_index
from fsct.data.shards import SplitWriter, _dataset_stats, _raw_samples, _write_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("real", type=Path)
    p.add_argument("synthetic", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("n", type=int)
    a = p.parse_args()
    index = read_index(a.real)
    syn = read_index(a.synthetic)["splits"]["train"]
    keys = set(sorted(k for k, s in syn["samples"].items() if s["classes"])[: a.n])
    shutil.copytree(a.real, a.out)
    # written as `fsct shard` writes a split (fsct.data.shards.grow_splits does the same), under new keys
    writer = SplitWriter(a.out, "train-synthetic", max_count=1 << 30, max_bytes=1 << 40)
    for sample in _raw_samples(a.synthetic, syn):
        if sample["__key__"] in keys:
            meta = json.loads(sample["meta.json"])
            sample["__key__"] = meta["key"] = "syn" + sample["__key__"]
            sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
            writer.write(sample)
    writer.close()
    added, train = writer.summary(), index["splits"]["train"]
    train["samples"].update(added["samples"])
    for c, refs in added["classes"].items():
        train["classes"].setdefault(c, []).extend(refs)
    train["shards"] += added["shards"]
    train["n_samples"] += added["n_samples"]
    index["stats"] = _dataset_stats(index)
    _write_index(a.out / "index.json", index)
    print(f"{a.out}: {a.real}'s shards + {added['n_samples']} synthetic train slices of {a.synthetic}")


if __name__ == "__main__":
    main()

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
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("real", type=Path)
    p.add_argument("synthetic", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("n", type=int)
    a = p.parse_args()
    index = json.loads((a.real / "index.json").read_text())
    syn = json.loads((a.synthetic / "index.json").read_text())["splits"]["train"]
    keys = sorted(k for k, s in syn["samples"].items() if s["classes"])[: a.n]
    files: dict[str, bytes] = {}
    for shard in sorted({syn["samples"][k]["shard"] for k in keys}):
        with tarfile.open(a.synthetic / shard) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                if key in keys:
                    data = t.extractfile(m).read()
                    if ext == "meta.json":
                        data = json.dumps({**json.loads(data), "key": "syn" + key}).encode()
                    files[f"syn{key}.{ext}"] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    name = "train-synthetic.tar"
    train = index["splits"]["train"]
    for k in keys:
        classes = syn["samples"][k]["classes"]
        train["samples"]["syn" + k] = {"classes": classes, "shard": name}
        for c in classes:
            train["classes"].setdefault(c, []).append([name, "syn" + k])
    train["shards"].append({"bytes": len(buf.getvalue()), "n_samples": len(keys), "name": name,
                            "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    train["n_samples"] += len(keys)
    index["stats"]["n_samples"] += len(keys)
    index["stats"]["n_samples_per_split"]["train"] += len(keys)
    shutil.copytree(a.real, a.out)
    (a.out / name).write_bytes(buf.getvalue())
    (a.out / "index.json").write_text(json.dumps(index))
    print(f"{a.out}: {a.real}'s shards + {len(keys)} synthetic train slices of {a.synthetic}")


if __name__ == "__main__":
    main()

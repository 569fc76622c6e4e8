"""Does fsct's PANet beat the notebook's model? The same config and budget (configs/demo.yaml) for
`model.variant: panet` and `model.variant: seed`, on synthetic data and on realct-mini (its val split
holds slices out as queries). Prints and writes the validation mIoU of each run.

  python tools/compare_variants.py --work outputs/compare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def fsct(*args: str) -> None:
    print("$ fsct " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "fsct", *args], check=True, cwd=REPO)


def last_val(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/miou" in r][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "compare")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    data = {"synthetic": a.work / "synth-shards", "realct-mini": a.work / "realct-shards"}
    if not (data["synthetic"] / "index.json").is_file():
        fsct("synth", "--out", str(a.work / "synth"), "--preset", "demo", "--overwrite")
        fsct("shard", "--images", str(a.work / "synth" / "X_train" / "images"), "--labels",
             str(a.work / "synth" / "Y_train.csv"), "--out", str(data["synthetic"]), "--overwrite")
    if not (data["realct-mini"] / "index.json").is_file():
        real = SHARED / "data" / "realct-mini"
        fsct("shard", "--images", str(real / "X_train" / "images"), "--labels", str(real / "Y_train.csv"),
             "--out", str(data["realct-mini"]), "--val-fraction", "0.3", "--overwrite")
    results = {}
    for name, shards in data.items():
        for variant in ("panet", "seed"):
            run = a.work / f"{name}-{variant}"
            fsct("train", "--overwrite", "--config", a.config, f"data.shards={shards}", f"train.output_dir={run}",
                 f"model.variant={variant}", "train.val_episodes=30", *a.overrides)
            results[f"{name}/{variant}"] = last_val(run)
    (a.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'data/variant':<24}{'val mIoU (fg)':>15}{'val mIoU (+bg)':>16}{'val ARI fg':>12}")
    for k, v in results.items():
        print(f"{k:<24}{v['val/miou']:>15.4f}{v['val/miou_bg']:>16.4f}{v['val/ari_fg']:>12.4f}")


if __name__ == "__main__":
    main()

"""The GPU recipe is the CPU recipe at full scale: everything measured on CPU (model, episodes,
augmentation, partition settings) must carry over, or the GPU recipe is an untested one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsct.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]

# what scale may change: input size and widths, batch, schedule, logging, checkpoint cadence, throughput knobs
SCALE_KEYS = {
    "data.shards", "data.image_size", "episodes.episodes_per_step", "model.decoder_dim", "model.feature_dim",
    "model.channels_last", "model.compile", "optim.warmup_steps", "predict.batch_size",
}
SCALE_SECTIONS = ("train.",)
STILL_THE_RECIPE = {"train.best_metric", "train.region_floor", "train.tune_threshold", "train.val_slices"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "mix":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_gpu_recipe_differs_from_the_cpu_recipe_only_in_scale() -> None:
    cpu = _flat(to_dict(load_config(ROOT / "configs/partition_cpu.yaml")))
    gpu = _flat(to_dict(load_config(ROOT / "configs/partition_gpu.yaml")))
    differ = {k for k in cpu if cpu[k] != gpu[k]}
    recipe = {k for k in differ if k not in SCALE_KEYS and (not k.startswith(SCALE_SECTIONS) or k in STILL_THE_RECIPE)}
    assert not recipe, {k: (cpu[k], gpu[k]) for k in sorted(recipe)}
    # and it is a full-scale recipe, not a copy
    assert gpu["data.image_size"] == 512 and gpu["train.max_steps"] > cpu["train.max_steps"]

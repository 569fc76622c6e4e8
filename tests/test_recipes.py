"""The GPU recipe is the CPU recipe at full scale: everything measured on CPU (model, episodes,
augmentation, partition settings) must carry over, or the GPU recipe is an untested one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fsct.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# what scale may change: input size and widths, batch, schedule, logging, checkpoint cadence, throughput knobs
SCALE_KEYS = {
    "data.shards", "data.image_size", "episodes.episodes_per_step", "model.decoder_dim", "model.feature_dim",
    "model.channels_last", "model.compile", "optim.warmup_steps", "predict.batch_size",
}
# train.* is schedule and logging, except how the checkpoint and the partition's settings are chosen
STILL_THE_RECIPE = {"train.best_metric", "train.region_floor", "train.tune_threshold", "train.val_slices"}


def may_scale(key: str) -> bool:
    return key in SCALE_KEYS or (key.startswith("train.") and key not in STILL_THE_RECIPE)


def _flat(section: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.boundary_weight": 3.0, ...}: the config tree's leaves (a dict-valued field such as
    episodes.mix is one leaf) by their command-line keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def test_gpu_recipe_differs_from_the_cpu_recipe_only_in_scale() -> None:
    cpu = _flat(load_config(ROOT / "configs/partition_cpu.yaml"))
    gpu = _flat(load_config(ROOT / "configs/partition_gpu.yaml"))
    recipe = {k for k in cpu if cpu[k] != gpu[k] and not may_scale(k)}
    assert not recipe, {k: (cpu[k], gpu[k]) for k in sorted(recipe)}
    # and it is a full-scale recipe, not a copy
    assert gpu["data.image_size"] == 512 and gpu["train.max_steps"] > cpu["train.max_steps"]

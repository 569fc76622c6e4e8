"""How `fsct train` meets `accelerate launch`: which precision, which backend, which tracker. Decided here,
before the Accelerator exists, so a launch that cannot work stops with one line instead of N lone runs."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsct.errors import FsctError

# accelerate's tracker names for train.tracker, and the package each one needs
TRACKER_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow"}
_TRUE = ("1", "true", "yes", "on")


def resolve_precision(setting: str, cuda: bool, env: Mapping[str, str] = os.environ) -> str:
    """`auto` defers to accelerate's own setting (`accelerate config`, `--mixed_precision`: both reach the
    process as ACCELERATE_MIXED_PRECISION), else bf16 on GPU and no on CPU; any other value is explicit."""
    if setting != "auto":
        return setting
    if env.get("ACCELERATE_MIXED_PRECISION"):
        return env["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if cuda else "no"


def check_devices(cuda: bool, env: Mapping[str, str] = os.environ, cpus: int | None = None) -> dict[str, str]:
    """Env changes a launch needs before the Accelerator starts, or FsctError where it cannot work.

    Without CUDA: a launch that names GPUs (gpu_ids -> CUDA_VISIBLE_DEVICES) or starts more processes than
    there are CPU cores (a GPU config such as gpu_8.yaml) is refused; any other multi-process launch gets the
    CPU backend (gloo), which accelerate only picks with ACCELERATE_USE_CPU: without it each process would
    train alone into the same output dir."""
    if cuda:
        return {}
    world = int(env.get("WORLD_SIZE", "1") or 1)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    launched = "LOCAL_RANK" in env or "ACCELERATE_MIXED_PRECISION" in env  # under `accelerate launch`
    if visible not in ("", "-1") and launched:
        raise FsctError(f"this launch asks for GPUs (CUDA_VISIBLE_DEVICES={visible}) but torch sees none: use "
                        "launch/accelerate/cpu_2proc.yaml (or no accelerate launch) on a machine without GPUs")
    if world <= 1 or env.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
        return {}
    cpus = cpus or os.cpu_count() or 1
    if world > cpus:
        raise FsctError(f"{world} processes on a machine without GPUs and {cpus} CPU cores: a GPU launch config "
                        "needs GPUs; on CPU use launch/accelerate/cpu_2proc.yaml (or --num_processes <= cores)")
    return {"ACCELERATE_USE_CPU": "true"}


def prepare_launch(cuda: bool) -> None:
    """Apply check_devices to this process. Only rank 0 says why it stops, so the refusal is one line."""
    try:
        os.environ.update(check_devices(cuda))
    except FsctError:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            raise SystemExit(1) from None
        raise


def log_with(tracker: str) -> str | None:
    """train.tracker -> accelerate's log_with; a tracker whose package is missing fails now, in one line."""
    if tracker == "none":
        return None
    package = TRACKER_PACKAGES[tracker]
    if importlib.util.find_spec(package) is None:
        raise FsctError(f"train.tracker={tracker} needs the '{package}' package: pip install {package}")
    return tracker


def tracker_init_kwargs(tracker: str, cfg_train: Any, out: Path, run_id: str | None) -> dict[str, Any]:
    if tracker == "wandb":
        return {"wandb": {"name": cfg_train.run_name or out.name, "entity": cfg_train.entity,
                          "tags": cfg_train.tags, "id": run_id, "resume": "allow", "dir": str(out)}}
    if tracker == "mlflow":
        return {"mlflow": {"run_name": cfg_train.run_name or out.name, "tags": {t: "" for t in cfg_train.tags}}}
    return {}


def define_best_metrics(acc: Any, tracker: str, best_metric: str) -> None:
    """W&B keeps the last value of a metric in the run summary; a validation metric's best is what runs
    are compared by, so the summary holds the max of each (and of best_metric, whatever it is)."""
    if tracker != "wandb" or not acc.is_main_process:
        return
    run = acc.get_tracker("wandb", unwrap=True)
    for name in sorted({"val/miou", "val/miou_bg", "val/ari_fg", best_metric}):
        run.define_metric(name, summary="max")


def log_best_model(acc: Any, tracker: str, out: Path, best_step: int) -> None:
    """train.log_model: the best model (else the final one) as a W&B artifact of type model."""
    if tracker != "wandb" or not acc.is_main_process:
        return
    import wandb

    path = out / "best" / "model.safetensors"
    if best_step < 0 or not path.is_file():
        path = out / "model.safetensors"
    run = acc.get_tracker("wandb", unwrap=True)
    art = wandb.Artifact(f"model-{run.id}", type="model", metadata={"best_step": best_step})
    art.add_file(str(path), name="model.safetensors")
    art.add_file(str(out / "config.yaml"), name="config.yaml")
    run.log_artifact(art, aliases=["best", "latest"] if best_step >= 0 else ["latest"])


def image_panel_due(step: int, last: int, every: int) -> bool:
    """image_every is a period in steps: a panel at the first validation, then at the first validation at
    least `every` steps after the last panel (validations come every val_every steps)."""
    return every > 0 and (last < 0 or step - last >= every)

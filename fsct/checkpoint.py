"""What training saves and reads back, every write through fsct.atomic.

- The model file: `model.safetensors` beside the resolved `config.yaml`, in a run's output dir or its
  `best/`; what `fsct predict --checkpoint` reads (`save_model`, `load_model`).
- Training checkpoints: `checkpoints/step_NNNNNNNN/` (Accelerate's state, `trainer_state.json` and each
  rank's audit), renamed into place only once complete; `find_checkpoint` picks the one a resume can trust,
  judging files without loading them, and `save_checkpoint` keeps the newest `train.keep_checkpoints`.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fsct.atomic import atomic_file, replace_dir
from fsct.config import Config, load_config, save_config
from fsct.errors import FsctError

CKPT_PREFIX = "step_"
PARTIAL = ".partial-"
WEIGHTS = "model.safetensors"


# --- the model file ---------------------------------------------------------------------------------------

def host_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as safetensors takes it: on the host, contiguous (channels_last weights are not)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, cfg: Config, folder: Path) -> None:
    """safetensors weights beside the resolved config, each file replaced whole."""
    from safetensors.torch import save_file

    with atomic_file(folder / WEIGHTS) as tmp:
        save_file(host_weights(model), str(tmp))
    with atomic_file(folder / "config.yaml") as tmp:
        save_config(cfg, tmp)


def weights_path(path: Path) -> Path:
    """The weights of a model folder, or `path` itself when it names the file."""
    return path if path.suffix == ".safetensors" else path / WEIGHTS


def load_model(path: Path | str, overrides: list[str] | None = None) -> tuple[Any, Config]:
    """A folder with model.safetensors + config.yaml (a run's output dir, its best/, or the file itself)
    -> the PANet in eval mode (eager, on the CPU) and its config with `overrides` applied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fsct.model.panet import PANet

    path = Path(path)
    weights = weights_path(path)
    folder = weights.parent
    if not weights.is_file() or not (folder / "config.yaml").is_file():
        raise FsctError(f"{path}: not a checkpoint (needs model.safetensors and config.yaml)")
    cfg = load_config(folder / "config.yaml", overrides)
    cfg.model.compile = False
    cfg.model.pretrained = ""  # the checkpoint holds every weight: no pretrained file or hub needed here
    model = PANet(cfg.model)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError, SafetensorError) as e:
        raise FsctError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from e
    return model.eval(), cfg


# --- training checkpoints ---------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    """Committed checkpoints, oldest first (a checkpoint is renamed into place only once complete)."""
    return sorted(p for p in (out / "checkpoints").glob(f"{CKPT_PREFIX}*") if p.is_dir())


def clear_partial(out: Path) -> None:
    """Remove what killed checkpoint writers left (hidden entries of checkpoints/). Only under the run lock."""
    for partial in (out / "checkpoints").glob(".*"):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def save_checkpoint(acc: Any, out: Path, step: int, trainer_state: dict[str, Any], keep: int,
                    save_rank: Callable[[Path], None]) -> None:
    """Every rank writes into a hidden folder (Accelerate's state, then `save_rank(folder)` for its own
    records); the main process adds trainer_state.json and renames it into place once complete, so a kill
    at any point leaves either no checkpoint of this step or a whole one. Then only the newest `keep`
    checkpoints stay."""
    name = f"{CKPT_PREFIX}{step:08d}"
    path, partial = out / "checkpoints" / name, out / "checkpoints" / f"{PARTIAL}{name}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    save_rank(partial)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_file(partial / "trainer_state.json") as tmp:
            tmp.write_text(json.dumps(trainer_state))
        replace_dir(partial, path)  # the same step saved again: a resume that had nothing left to do
        prune_checkpoints(out, keep)
    acc.wait_for_everyone()


def prune_checkpoints(out: Path, keep: int) -> None:
    old = checkpoints(out)
    for stale in old[: max(0, len(old) - max(1, keep))]:
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(acc: Any, ckpt: Path) -> dict[str, Any]:
    """Restore Accelerate's state from `ckpt` and return its trainer_state.json."""
    try:
        acc.load_state(str(ckpt))
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
        raise FsctError(f"{ckpt}: cannot load checkpoint ({str(e).splitlines()[0]}); pass --resume "
                        "with an older checkpoints/step_* dir") from e
    return json.loads((ckpt / "trainer_state.json").read_text())


def _safetensors_problem(path: Path) -> str | None:
    """The header names every tensor's byte range: a short or empty file cannot match it."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has a corrupt header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is {size} bytes, its header says {8 + n + end}"
    return None


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, judged without loading it; None when it looks whole."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix == ".bin" and zipfile.is_zipfile(path):  # torch.save's zip layout: CRC-check members
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{path.name}: {e}"
        return f"{path.name}: member {bad} is damaged" if bad else None
    if path.suffix in (".bin", ".pkl", ".pt") and path.stat().st_size == 0:
        return f"{path.name} is empty"
    if path.suffix in (".bin", ".pt"):
        return f"{path.name} is not a torch zip file"
    return None


def checkpoint_problem(path: Path) -> str | None:
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json is corrupt"
    for f in sorted(path.iterdir()):
        if f.is_file():
            problem = file_problem(f)
            if problem:
                return problem
    return None


def find_checkpoint(out: Path, resume: str | None, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from: `resume` itself, or with 'auto' the newest complete and loadable one
    in `out` (saying which newer ones it skipped and why); None when 'auto' finds none."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        problem = checkpoint_problem(path) if path.is_dir() else "not a folder"
        if problem:
            raise FsctError(f"{path}: not a usable checkpoint ({problem})")
        return path
    for path in reversed(checkpoints(out)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"skipped checkpoint {path}: {problem}")
    return None

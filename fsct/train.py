"""`fsct train`: episodic PANet training with Accelerate, alone or under `accelerate launch`.

Each rank streams its own episodes (its own shards, its own seed stream); only gradients are shared.
Preemption-safe: SIGUSR1/SIGTERM on any rank, or a PREEMPT file in the output dir, makes every rank
checkpoint at the next step and exit 0; `--resume auto` continues from the newest checkpoint with exactly
the episodes an uninterrupted run would have drawn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml

from fsct import launch
from fsct.config import Config, load_config, save_config, to_dict
from fsct.data.episodes import Batch, Episode, EpisodeSampler, EpisodeStream, PoolTensors, make_batch, step_generator
from fsct.data.pool import Pool, load_split, rank_subset, read_index
from fsct.errors import FsctError
from fsct.lock import locked
from fsct.malloc import keep_freed_memory
from fsct.metrics import episode_miou, official_score_slice
from fsct.model.panet import build_model
from fsct.progress import is_terminal
from fsct.runs import (
    CKPT_PREFIX,
    PARTIAL,
    EpisodeAudit,
    checkpoints,
    prepare_run_dir,
    truncate_metrics,
    write_json,
    write_text,
)
from fsct.runs import find_checkpoint as _find_checkpoint


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best: float = -math.inf
    best_step: int = -1
    bad_validations: int = 0
    wandb_id: str | None = None


class StopFlag:
    """Set by SIGTERM/SIGUSR1 or by a PREEMPT file; checked once per step by every rank."""

    def __init__(self, preempt_file: Path):
        self.signalled = False
        self.preempt_file = preempt_file
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def local(self, is_main: bool) -> bool:
        return self.signalled or (is_main and self.preempt_file.exists())


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine to min_lr_ratio; a function of the step, so resuming needs no state."""
    o, total = cfg.optim, max(cfg.train.max_steps, 1)
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: nn.Module, cfg: Config, dev: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (one kernel for all parameters)."""
    o = cfg.optim
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                             fused=o.fused and dev.type == "cuda")


def resolve_precision(cfg: Config) -> str:
    return launch.resolve_precision(cfg.train.mixed_precision, torch.cuda.is_available())


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """`resume` itself, or with 'auto' the newest complete and loadable checkpoint (see fsct.runs)."""
    return _find_checkpoint(out, resume)


def param_digest(model: nn.Module, buffers: bool = False) -> str:
    """A short hash of the weights (and, with buffers, BatchNorm statistics: those stay per rank in DDP)."""
    h = hashlib.sha256()
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    for name, p in sorted(tensors.items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> TrainerState:
    """One writer per output dir (a lock held by the main process), and never into another run's dir
    unless asked to continue it (--resume) or replace it (--overwrite)."""
    out = Path(cfg.train.output_dir)
    # Before the Accelerator exists: `accelerate launch` (torchrun) names each process's global rank.
    main = int(os.environ.get("RANK", "0")) == 0
    with locked(out, "run dir", enabled=main):
        prepare_run_dir(out, resume, overwrite, main)  # other ranks only read; nothing they do races it
        return _train(cfg, resume)


def _train(cfg: Config, resume: str | None) -> TrainerState:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(cfg.train.output_dir)
    tracker = cfg.train.tracker
    use_wandb = tracker == "wandb"
    launch.prepare_launch(torch.cuda.is_available())
    acc = Accelerator(mixed_precision=resolve_precision(cfg), gradient_accumulation_steps=cfg.optim.grad_accum,
                      log_with=launch.log_with(tracker), project_dir=str(out))
    rank, world, dev = acc.process_index, acc.num_processes, acc.device
    stop = StopFlag(out / "PREEMPT")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "DONE").unlink(missing_ok=True)
    set_seed(cfg.train.seed)  # same init on every rank

    # --- data: each rank reads its own shards into memory; episodes are index draws on that pool
    shards = Path(cfg.data.shards)
    names, keys = rank_subset(shards, cfg.data.train_split, rank, world)
    modes = cfg.episodes.effective_mix
    pool = load_split(shards, cfg.data.train_split, names, cfg.data.image_size, keys)
    sp_pool = superpixel_pool(cfg, shards, rank, world) if "superpixel" in modes else None
    sampler = EpisodeSampler(pool, cfg.episodes, cfg.train.seed, rank, superpixel_pool=sp_pool)
    val = _val_setup(cfg, shards)

    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg, dev)
    # the loss is computed inside forward (q_lbl given), so DDP's gradient hooks see it all
    step_fn, opt = acc.prepare(model, opt)

    state = TrainerState()
    ckpt = _find_checkpoint(out, resume, log=lambda m: acc.print(m, flush=True))
    if ckpt is not None:
        try:
            acc.load_state(str(ckpt))
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
            raise FsctError(f"{ckpt}: cannot load checkpoint ({str(e).splitlines()[0]}); pass --resume "
                            "with an older checkpoints/step_* dir") from e
        state = TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))
        acc.print(f"resumed from {ckpt} at step {state.step}", flush=True)
    elif resume == "auto" and checkpoints(out):
        raise FsctError(f"{out / 'checkpoints'}: no loadable checkpoint to resume from")
    if acc.is_main_process:
        truncate_metrics(out / "metrics.jsonl", state.step)  # rows after the checkpoint come again
    if acc.is_main_process and state.wandb_id is None:
        state.wandb_id = _wandb_id(out)
    if tracker != "none":
        acc.init_trackers(cfg.train.project, config=to_dict(cfg),
                          init_kwargs=launch.tracker_init_kwargs(tracker, cfg.train, out, state.wandb_id))
        launch.define_best_metrics(acc, tracker, cfg.train.best_metric)
    last_panel = -1

    batches = episode_batches(cfg, sampler, pool, sp_pool, state.step, dev)
    drawn = EpisodeAudit.load(ckpt, rank)  # which slices this rank trained on, for the audit in rank{r}.json
    progress = _Progress(cfg, acc.is_main_process, state.step)
    log_t, log_eps = time.perf_counter(), 0
    while state.step < cfg.train.max_steps:
        step = state.step
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(cfg.optim.grad_accum):
            episodes, batch = next(batches)
            for ep in episodes:
                keys = (sp_pool if ep.source == "superpixel" else pool).keys
                drawn.update(" ".join(keys[i] for i in (*ep.support, *ep.query)).encode() + b";")
            with acc.accumulate(step_fn):
                with acc.autocast():
                    terms = step_fn(batch.s_img, batch.s_lbl, batch.q_img, batch.n_way, q_lbl=batch.q_lbl,
                                    raw=batch.raw)
                acc.backward(terms["loss"])
                grad_norm = acc.clip_grad_norm_(step_fn.parameters(), cfg.optim.grad_clip) \
                    if acc.sync_gradients and cfg.optim.grad_clip > 0 else None
                opt.step()
                opt.zero_grad(set_to_none=True)
        state.step += 1
        drawn.end_step()
        log_eps += cfg.episodes.episodes_per_step * cfg.optim.grad_accum * world

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            now = time.perf_counter()
            logs = {f"train/{k}": float(v.detach()) for k, v in terms.items() if k != "logits" and v.ndim == 0}
            logs.update({"train/lr": lr, "perf/episodes_per_s": log_eps / (now - log_t)})
            if grad_norm is not None:
                logs["train/grad_norm"] = float(grad_norm)
            if dev.type == "cuda":
                logs["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            acc.log(logs, step=state.step)
            _append_metrics(acc, out, state.step, logs)
            progress.update(state.step, logs)
            log_t, log_eps = now, 0

        if val is not None and cfg.train.val_every > 0 and (
                state.step % cfg.train.val_every == 0 or state.step == cfg.train.max_steps):
            metrics, panel = validate(acc, step_fn, val, cfg)
            acc.log(metrics, step=state.step)
            _append_metrics(acc, out, state.step, metrics)
            if use_wandb and acc.is_main_process and panel and launch.image_panel_due(
                    state.step, last_panel, cfg.train.image_every):
                _log_panel(acc, panel, state.step)
                last_panel = state.step
            progress.message(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            score = metrics[cfg.train.best_metric]
            if score > state.best:
                state.best, state.best_step, state.bad_validations = score, state.step, 0
                _save_model(acc, step_fn, cfg, out / "best")
            else:
                state.bad_validations += 1
            if 0 < cfg.train.patience <= state.bad_validations:
                progress.message(f"early stop at step {state.step}: no better {cfg.train.best_metric} in "
                                 f"{state.bad_validations} validations (best {state.best:.4f} at {state.best_step})")
                break

        if _stop_requested(acc, stop):
            _checkpoint(acc, out, state, cfg, drawn)
            if acc.is_main_process:
                (out / "PREEMPT").unlink(missing_ok=True)
                write_text(out / "PREEMPTED", f"{state.step}\n")
            progress.close()
            acc.print(f"preempted: checkpoint saved at step {state.step}", flush=True)
            acc.end_training()
            return state
        if cfg.train.save_every > 0 and state.step % cfg.train.save_every == 0:
            _checkpoint(acc, out, state, cfg, drawn)

    progress.close()
    _checkpoint(acc, out, state, cfg, drawn)
    _save_model(acc, step_fn, cfg, out)
    final = acc.unwrap_model(step_fn)
    write_json(out / f"rank{rank}.json", {
        "rank": rank, "step": state.step, "params": param_digest(final),
        "state": param_digest(final, buffers=True), "pool_keys": pool.keys,
        "episodes": state.step * cfg.optim.grad_accum * cfg.episodes.episodes_per_step,
        "episodes_digest": drawn.digest[:16]})
    if acc.is_main_process:
        (out / "PREEMPTED").unlink(missing_ok=True)
        write_text(out / "DONE", json.dumps(asdict(state)) + "\n")
        acc.print(f"done: {state.step} steps; model {out / 'model.safetensors'}"
                  + (f"; best {cfg.train.best_metric} {state.best:.4f} at step {state.best_step}"
                     if state.best_step >= 0 else ""), flush=True)
    if cfg.train.log_model:
        launch.log_best_model(acc, tracker, out, state.best_step)
    acc.end_training()
    return state


def _stop_requested(acc, stop: StopFlag) -> bool:
    """All ranks agree (max over ranks), so they checkpoint at the same step. A single process skips the
    collective: its .item() would make the host wait for the GPU every step."""
    local = stop.local(acc.is_main_process)
    if acc.num_processes == 1:
        return local
    return acc.reduce(torch.tensor([float(local)], device=acc.device), "max").item() > 0


def _append_metrics(acc, out: Path, step: int, values: dict[str, float]) -> None:
    """metrics.jsonl in the output dir: the run's history without W&B (and for scripts comparing runs)."""
    if acc.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _wandb_id(out: Path) -> str:
    path = out / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = hashlib.sha1(f"{out.resolve()}{time.time()}".encode()).hexdigest()[:12]
    write_text(path, run_id + "\n")
    return run_id


def superpixel_pool(cfg: Config, shards: Path, rank: int, world: int) -> Pool:
    """This rank's share of the unlabelled split, whose superpixel maps feed superpixel episodes."""
    split = cfg.data.unlabeled_split
    names, keys = rank_subset(shards, split, rank, world)
    return load_split(shards, split, names, cfg.data.image_size, keys)


def episode_batches(cfg: Config, sampler: EpisodeSampler, pool: Pool, sp_pool: Pool | None, start: int,
                    dev: torch.device) -> Iterator[tuple[list[Episode], Batch]]:
    """(episodes, batch) for micro-steps from start * grad_accum on, batch on `dev`: built on the device
    from a device-side pool (the fast path), or on the CPU by DataLoader workers."""
    first, stop = start * cfg.optim.grad_accum, cfg.train.max_steps * cfg.optim.grad_accum
    if cfg.data.num_workers > 0:
        stream = EpisodeStream(sampler, pool, cfg.augment, first, stop, sp_pool)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                                             pin_memory=dev.type == "cuda", persistent_workers=False)
        for step, batch in loader:
            yield sampler.step(step), batch.to(dev)
        return
    where = dev if cfg.data.cache_on_device else torch.device("cpu")
    tensors = PoolTensors.from_pool(pool, where)
    sp = PoolTensors.from_pool(sp_pool, where) if sp_pool is not None else None
    for micro in range(first, stop):
        gen = step_generator(sampler.seed, sampler.rank, micro, where)
        episodes = sampler.step(micro)
        yield episodes, make_batch(episodes, tensors, cfg.episodes.n_way, cfg.augment, gen, sp).to(dev)


@dataclass
class ValSet:
    sampler: EpisodeSampler
    tensors: PoolTensors


def _val_setup(cfg: Config, shards: Path) -> ValSet | None:
    index = read_index(shards)
    if cfg.train.val_every <= 0 or cfg.data.val_split not in index["splits"]:
        return None
    pool = load_split(shards, cfg.data.val_split, size=cfg.data.image_size)
    held_out = set(index.get("val_classes") or []) or None  # novel-class validation when classes are held out
    # Validation scores true masks: superpixel ways are pseudo-labels, and the val split has none.
    mix = {m: w for m, w in cfg.episodes.effective_mix.items() if m != "superpixel"}
    val_cfg = type(cfg.episodes)(**{**asdict(cfg.episodes), "episodes_per_step": 1,
                                    "mix": mix or {"slice": 1.0}})
    try:
        sampler = EpisodeSampler(pool, val_cfg, cfg.train.val_seed, rank=0, allowed_classes=held_out)
        sampler.episode(0)
    except FsctError as e:
        print(f"validation off: {e}", flush=True)
        return None
    return ValSet(sampler, PoolTensors.from_pool(pool))


@torch.no_grad()
def validate(acc, step_fn: nn.Module, val: ValSet, cfg: Config) -> tuple[dict[str, float], list]:
    """Fixed seeded val episodes, split across ranks; sums are reduced so every rank sees the same numbers."""
    model = acc.unwrap_model(step_fn)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    panel = []
    for i in range(acc.process_index, cfg.train.val_episodes, acc.num_processes):
        batch = make_batch([val.sampler.episode(i)], val.tensors, cfg.episodes.n_way, None, None).to(acc.device)
        with acc.autocast():
            logits = model(batch.s_img, batch.s_lbl, batch.q_img, batch.n_way)
        pred = logits.argmax(2)[0]
        truth = batch.q_lbl[0]
        fg, with_bg = episode_miou(pred, truth, batch.n_way + 1)
        t_np, p_np = truth.cpu().numpy(), pred.cpu().numpy()
        ari = np.mean([official_score_slice(t, p) for t, p in zip(t_np, p_np, strict=True)])
        sums += torch.tensor([fg, with_bg, ari, 1.0], dtype=torch.float64)
        if i == 0:
            panel = [(batch.q_img[0, j, 0].float().cpu().numpy(), pred[j].cpu().numpy(), truth[j].cpu().numpy())
                     for j in range(min(4, pred.shape[0]))]
    part = partition_scores(model, val, cfg, acc.process_index, acc.num_processes) if model.dense_head else None
    model.train()
    sums = acc.reduce(sums.to(acc.device), "sum").cpu()
    n = max(sums[3].item(), 1.0)
    metrics = {"val/miou": sums[0].item() / n, "val/miou_bg": sums[1].item() / n, "val/ari_fg": sums[2].item() / n}
    if part is not None:
        # A dense model's val/ari_fg is the official score of its partition of whole val slices, what
        # `fsct predict` submits, at the best threshold of the grid (kept in cfg.predict: it is saved with
        # the model); the episode argmax ARI stays visible as val/ari_episode.
        part = acc.reduce(part.to(acc.device), "sum").cpu()
        means = part[:-1] / max(part[-1].item(), 1.0)
        best = int(means.argmax())
        cfg.predict.boundary_threshold = val_thresholds(cfg)[best]
        metrics["val/ari_episode"] = metrics["val/ari_fg"]
        metrics["val/ari_fg"] = means[best].item()
        metrics["val/boundary_threshold"] = cfg.predict.boundary_threshold
    return metrics, panel


def partition_scores(model: nn.Module, val: ValSet, cfg: Config, rank: int, world: int) -> torch.Tensor:
    """Per threshold of the grid (fsct.threshold), the sum of the official scores of the configured partition
    over this rank's share of the first `train.val_slices` val slices at the training size, then the count."""
    from fsct.predict import boundary_batch
    from fsct.threshold import threshold_scores

    grid = val_thresholds(cfg)
    idx = list(range(rank, min(cfg.train.val_slices, len(val.tensors.images)), world))
    if not idx or val.tensors.masks is None:
        return torch.zeros(len(grid) + 1, dtype=torch.float64)
    dev = next(model.parameters()).device
    prob = boundary_batch(model, val.tensors.images[idx].to(dev), False, cfg.data.image_size)
    scores = threshold_scores(prob, val.tensors.images[idx].cpu().numpy(), val.tensors.masks[idx].cpu().numpy(),
                              cfg.predict, grid)
    return torch.tensor([*scores.sum(1), len(idx)], dtype=torch.float64)


def val_thresholds(cfg: Config) -> tuple[float, ...]:
    from fsct.threshold import GRID

    return GRID if cfg.train.tune_threshold else (cfg.predict.boundary_threshold,)


def _log_panel(acc, panel: list, step: int) -> None:
    import wandb

    images = [wandb.Image((img * 0.5 + 0.5).clip(0, 1), masks={
        "prediction": {"mask_data": pred.astype(np.uint8)}, "ground_truth": {"mask_data": truth.astype(np.uint8)}},
        caption=f"query {j}") for j, (img, pred, truth) in enumerate(panel)]
    acc.get_tracker("wandb", unwrap=True).log({"val/queries": images}, step=step)


def _checkpoint(acc, out: Path, state: TrainerState, cfg: Config, audit: EpisodeAudit) -> None:
    """Written under a hidden name and renamed into place once complete: a kill at any point leaves
    either no checkpoint of this step or a whole one."""
    name = f"{CKPT_PREFIX}{state.step:08d}"
    path, partial = out / "checkpoints" / name, out / "checkpoints" / f"{PARTIAL}{name}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    audit.save(partial, acc.process_index, state.step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(partial / "trainer_state.json", asdict(state))
        if path.exists():  # the same step saved again (a resume that had nothing left to do)
            old = path.with_name(f"{PARTIAL}old-{name}")
            path.rename(old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, path)
        old = checkpoints(out)
        for stale in old[: max(0, len(old) - max(1, cfg.train.keep_checkpoints))]:
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()


def _save_model(acc, step_fn: nn.Module, cfg: Config, folder: Path) -> None:
    """safetensors weights beside the resolved config: what `fsct predict --checkpoint` reads."""
    from safetensors.torch import save_file

    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in acc.unwrap_model(step_fn).state_dict().items()}
        save_file(weights, str(folder / "model.safetensors.tmp"))
        (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
        save_config(cfg, folder / "config.yaml")


class _Progress:
    """A rich bar with loss and episodes/s on a terminal; plain one-line summaries in a log file."""

    def __init__(self, cfg: Config, enabled: bool, start: int):
        self.enabled, self.total, self.bar = enabled, cfg.train.max_steps, None
        if enabled and is_terminal():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=self.total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = f"loss {logs['train/loss']:.4f} lr {logs['train/lr']:.2e} {logs['perf/episodes_per_s']:.1f} ep/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total} {info}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file (configs/*.yaml)")
    p.add_argument("--resume", help="auto (newest checkpoint in the output dir, if any) or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the output dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100")


def run(args: argparse.Namespace) -> int:
    keep_freed_memory()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    train(cfg, args.resume, args.overwrite)
    return 0

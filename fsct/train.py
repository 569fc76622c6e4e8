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
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from fsct import launch
from fsct.checkpoint import checkpoints, find_checkpoint, load_checkpoint, save_checkpoint, save_model
from fsct.config import Config, load_config, save_config, to_dict
from fsct.data.episodes import Batch, EpisodeSampler, PoolTensors, TrainSource, load_train_data, make_batch
from fsct.data.pool import Pool, key_order, load_split, read_index, split_info
from fsct.ema import WeightAverage
from fsct.engine import StepResult, make_accelerator, make_optimizer, train_step
from fsct.errors import FsctError
from fsct.lock import locked
from fsct.malloc import keep_freed_memory
from fsct.metrics import episode_miou, official_score_slice
from fsct.model.panet import PANet, build_model
from fsct.progress import StepProgress
from fsct.runs import EpisodeAudit, prepare_run_dir, truncate_metrics, write_json, write_text
from fsct.vote import load_voter_slices, support_voters, vote_on


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
    """The run in order; each line is one named step, defined below."""
    from accelerate.utils import set_seed

    launch.prepare_launch(torch.cuda.is_available())
    set_region_floor(cfg)
    set_body_size(cfg)
    run = start_run(cfg)
    set_seed(cfg.train.seed)  # same init on every rank
    data = load_train_data(cfg, run.rank, run.world)
    val = _val_setup(cfg, Path(cfg.data.shards))
    model = build_model(cfg.model)
    model, opt = run.acc.prepare(model, make_optimizer(model, cfg, run.acc.device))
    state, ckpt = resume_state(run, resume)
    start_average(run, model, ckpt)
    start_tracking(run, state)
    audit = EpisodeAudit.load(ckpt, run.rank, data.share_keys)  # what this rank trained on: rank{r}.json
    data.restore(ckpt, run.rank)  # a stream's buffer and position at the checkpoint (memory: nothing to do)
    next_batch = audited_batches(run, data, state.step, audit)
    start_progress(run, state.step)
    while state.step < cfg.train.max_steps:
        result = train_step(run.acc, model, opt, next_batch, state.step, cfg)
        state.step += 1
        if run.ema is not None:
            run.ema.update(run.acc.unwrap_model(model))
        audit.end_step()
        log_step(run, state.step, result)
        if validation_due(cfg, state.step, val) and validate_and_keep_best(run, model, val, state):
            break  # early stop
        if stop_requested(run):
            preempt(run, state, audit, data)
            return state
        if cfg.train.save_every > 0 and state.step % cfg.train.save_every == 0:
            checkpoint(run, state, audit, data)
    finish(run, model, state, data, audit)
    return state


@dataclass
class Run:
    """What the steps of one training run share."""

    cfg: Config
    acc: Any
    out: Path
    stop: StopFlag
    progress: StepProgress | None = None
    last_panel: int = -1  # step of the last W&B image panel
    log_t: float = 0.0  # throughput since the last log line
    log_eps: int = 0
    ema: WeightAverage | None = None  # train.ema_decay > 0

    def served(self, model: nn.Module) -> nn.Module:
        """The weights validation scores and the model files hold: the average when there is one."""
        return model if self.ema is None else self.ema.model

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes


def set_region_floor(cfg: Config) -> None:
    """A dense model's partition floor (predict.min_regions) from its training labels, before config.yaml is
    written: it travels with the model as the tuned threshold does."""
    from fsct.threshold import region_floor

    if cfg.model.decoder == "unet" and cfg.train.region_floor:
        index = read_index(Path(cfg.data.shards))
        cfg.predict.min_regions = region_floor(index, cfg.data.train_split, cfg.predict.min_region)


def set_body_size(cfg: Config) -> None:
    """A dense model's body size (predict.body_size) from its training slices, before config.yaml is written:
    prediction sets other patients' bodies to it (fsct.body_scale)."""
    from fsct.body_scale import median_body_size

    if cfg.model.decoder == "unet" and cfg.train.body_scale:
        shards, split = Path(cfg.data.shards), cfg.data.train_split
        keys = sorted(split_info(read_index(shards), shards, split)["samples"], key=key_order)[:64]
        cfg.predict.body_size = median_body_size(load_split(shards, split, keys=set(keys)).images)


def start_run(cfg: Config) -> Run:
    """The Accelerator, the stop flag, and the run's config in its output dir."""
    out = Path(cfg.train.output_dir)
    acc = make_accelerator(cfg, log_with=launch.log_with(cfg.train.tracker), project_dir=str(out))
    run = Run(cfg, acc, out, StopFlag(out / "PREEMPT"))
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "DONE").unlink(missing_ok=True)
    return run


def start_average(run: Run, model: nn.Module, ckpt: Path | None) -> None:
    """The weight average (train.ema_decay): the checkpoint's, or a new one from the weights as they are."""
    if run.cfg.train.ema_decay > 0:
        fresh = PANet(replace(run.cfg.model, compile=False, pretrained="")).to(run.acc.device)
        run.ema = WeightAverage(fresh, run.acc.unwrap_model(model), run.cfg.train.ema_decay)
        if ckpt is not None and not run.ema.load(ckpt):
            run.acc.print(f"{ckpt} holds no weight average: it starts here", flush=True)


def resume_state(run: Run, resume: str | None) -> tuple[TrainerState, Path | None]:
    """The trainer state to start from: a fresh one, or the checkpoint's (Accelerate's state restored)."""
    ckpt = find_checkpoint(run.out, resume, log=lambda m: run.acc.print(m, flush=True))
    state = TrainerState()
    if ckpt is not None:
        state = TrainerState(**load_checkpoint(run.acc, ckpt))
        run.acc.print(f"resumed from {ckpt} at step {state.step}", flush=True)
    elif resume == "auto" and checkpoints(run.out):
        raise FsctError(f"{run.out / 'checkpoints'}: no loadable checkpoint to resume from")
    if run.acc.is_main_process:
        truncate_metrics(run.out / "metrics.jsonl", state.step)  # rows after the checkpoint come again
    return state, ckpt


def start_tracking(run: Run, state: TrainerState) -> None:
    """W&B (or another tracker) on the main process, continuing the run's id across resumes."""
    tracker = run.cfg.train.tracker
    if run.acc.is_main_process and state.wandb_id is None:
        state.wandb_id = _wandb_id(run.out)
    if tracker != "none":
        run.acc.init_trackers(run.cfg.train.project, config=to_dict(run.cfg),
                              init_kwargs=launch.tracker_init_kwargs(tracker, run.cfg.train, run.out, state.wandb_id))
        launch.define_best_metrics(run.acc, tracker, run.cfg.train.best_metric)


def audited_batches(run: Run, data: TrainSource, start: int, audit: EpisodeAudit) -> Callable[[], Batch]:
    """The next micro-batch of this rank's episode stream, each episode's slices recorded in the audit."""
    batches = data.batches(run.cfg, start, run.acc.device)

    def next_batch() -> Batch:
        keys, batch = next(batches)
        for k in keys:
            audit.update(k)
        return batch

    return next_batch


def start_progress(run: Run, step: int) -> None:
    """The progress bar (main process), and the throughput clock started at the first step."""
    run.progress = StepProgress(run.cfg.train.max_steps, step, run.acc.is_main_process)
    run.log_t, run.log_eps = time.perf_counter(), 0


def log_step(run: Run, step: int, result: StepResult) -> None:
    """Every log_every steps (and the last): loss terms, lr, throughput to the tracker, metrics.jsonl, bar."""
    cfg = run.cfg
    run.log_eps += cfg.episodes.episodes_per_step * cfg.optim.grad_accum * run.world
    if step % cfg.train.log_every != 0 and step != cfg.train.max_steps:
        return
    now = time.perf_counter()
    logs = {f"train/{k}": float(v.detach()) for k, v in result.terms.items() if k != "logits" and v.ndim == 0}
    logs.update({"train/lr": result.lr, "perf/episodes_per_s": run.log_eps / (now - run.log_t)})
    if result.grad_norm is not None:
        logs["train/grad_norm"] = float(result.grad_norm)
    if run.acc.device.type == "cuda":
        logs["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.acc.log(logs, step=step)
    _append_metrics(run, step, logs)
    run.progress.update(step, logs)
    run.log_t, run.log_eps = now, 0


def validation_due(cfg: Config, step: int, val: ValSet | None) -> bool:
    return val is not None and cfg.train.val_every > 0 and (
        step % cfg.train.val_every == 0 or step == cfg.train.max_steps)


def validate_and_keep_best(run: Run, model: nn.Module, val: ValSet, state: TrainerState) -> bool:
    """Validate, log, save best/ on a new best; True when patience has run out (early stop)."""
    cfg, acc, step = run.cfg, run.acc, state.step
    metrics, panel = validate(acc, run.served(model), val, cfg)
    acc.log(metrics, step=step)
    _append_metrics(run, step, metrics)
    if cfg.train.tracker == "wandb" and acc.is_main_process and panel and launch.image_panel_due(
            step, run.last_panel, cfg.train.image_every):
        _log_panel(acc, panel, step)
        run.last_panel = step
    run.progress.message(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    score = metrics[cfg.train.best_metric]
    if score > state.best:
        state.best, state.best_step, state.bad_validations = score, step, 0
        _save_model(run, model, run.out / "best")
    else:
        state.bad_validations += 1
    if 0 < cfg.train.patience <= state.bad_validations:
        run.progress.message(f"early stop at step {step}: no better {cfg.train.best_metric} in "
                             f"{state.bad_validations} validations (best {state.best:.4f} at {state.best_step})")
        return True
    return False


def checkpoint(run: Run, state: TrainerState, audit: EpisodeAudit, data: TrainSource) -> None:
    def save_rank(folder: Path) -> None:
        audit.save(folder, run.rank, state.step)
        data.save(folder, run.rank)
        if run.ema is not None and run.acc.is_main_process:
            run.ema.save(folder)

    save_checkpoint(run.acc, run.out, state.step, asdict(state), run.cfg.train.keep_checkpoints, save_rank)


def preempt(run: Run, state: TrainerState, audit: EpisodeAudit, data: TrainSource) -> None:
    """Checkpoint now and leave PREEMPTED (the step) for the launcher, which requeues the job."""
    checkpoint(run, state, audit, data)
    if run.acc.is_main_process:
        (run.out / "PREEMPT").unlink(missing_ok=True)
        write_text(run.out / "PREEMPTED", f"{state.step}\n")
    run.progress.close()
    run.acc.print(f"preempted: checkpoint saved at step {state.step}", flush=True)
    run.acc.end_training()


def finish(run: Run, model: nn.Module, state: TrainerState, data: TrainSource, audit: EpisodeAudit) -> None:
    """Last checkpoint, the model file, this rank's audit (rank{r}.json) and DONE."""
    cfg, acc, out = run.cfg, run.acc, run.out
    run.progress.close()
    checkpoint(run, state, audit, data)
    _save_model(run, model, out)
    final = acc.unwrap_model(model)
    write_json(out / f"rank{run.rank}.json", {
        "rank": run.rank, "step": state.step, "params": param_digest(final),
        "state": param_digest(final, buffers=True), "loader": data.loader, "shards": data.shard_names,
        "pool_keys": data.share_keys, "slices_reached": sum(audit.reached), "unreached": audit.unreached()[:20],
        "episodes": state.step * cfg.optim.grad_accum * cfg.episodes.episodes_per_step,
        "episodes_digest": audit.digest[:16], "peak_rss_mb": peak_rss_mb(),
        # the same seed gives the same weights only on the same device with the same thread count: CPU
        # kernels sum in an order set by their threads (docs/RESULTS.md: up to 0.15 in a checkpoint's score)
        "device": str(acc.device), "torch_threads": torch.get_num_threads()})
    if acc.is_main_process:
        (out / "PREEMPTED").unlink(missing_ok=True)
        write_text(out / "DONE", json.dumps(asdict(state)) + "\n")
        acc.print(f"done: {state.step} steps; model {out / 'model.safetensors'}"
                  + (f"; best {cfg.train.best_metric} {state.best:.4f} at step {state.best_step}"
                     if state.best_step >= 0 else ""), flush=True)
    if cfg.train.log_model:
        launch.log_best_model(acc, cfg.train.tracker, out, state.best_step)
    acc.end_training()


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (DataLoader workers are processes of their own): VmHWM, the high
    water mark of this program's memory. Not getrusage's ru_maxrss: Linux carries that over from the parent
    across fork and exec, so a child of a big process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _save_model(run: Run, model: nn.Module, folder: Path) -> None:
    if run.acc.is_main_process:
        save_model(run.acc.unwrap_model(run.served(model)), run.cfg, folder)


def stop_requested(run: Run) -> bool:
    """All ranks agree (max over ranks), so they checkpoint at the same step. A single process skips the
    collective: its .item() would make the host wait for the GPU every step."""
    local = run.stop.local(run.acc.is_main_process)
    if run.world == 1:
        return local
    return run.acc.reduce(torch.tensor([float(local)], device=run.acc.device), "max").item() > 0


def _append_metrics(run: Run, step: int, values: dict[str, float]) -> None:
    """metrics.jsonl in the output dir: the run's history without W&B (and for scripts comparing runs)."""
    if run.acc.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _wandb_id(out: Path) -> str:
    path = out / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = hashlib.sha1(f"{out.resolve()}{time.time()}".encode()).hexdigest()[:12]
    write_text(path, run_id + "\n")
    return run_id


@dataclass
class ValSet:
    sampler: EpisodeSampler
    tensors: PoolTensors
    # dense models: the first `train.val_slices` val slices at their own size, partitioned and scored as
    # `fsct predict` and the official metric do (masks at 256 px move small structures' borders)
    slices: Pool | None = None
    # predict.support_vote: the labelled train slices that vote on the partition's merges (images, masks)
    support: tuple[np.ndarray, np.ndarray] | None = None


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
    slices = None
    if cfg.model.decoder == "unet" and cfg.train.val_slices > 0 and pool.masks is not None:
        slices = load_split(shards, cfg.data.val_split, keys=set(pool.keys[: cfg.train.val_slices]))
    support = None
    if slices is not None and vote_on(cfg.predict):
        # what `fsct predict --support <these shards>` votes with (its default --support-split is train)
        support = load_voter_slices(shards, cfg.data.train_split, cfg.predict.vote_slices)
    return ValSet(sampler, PoolTensors.from_pool(pool), slices, support)


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
    over this rank's share of the first `train.val_slices` val slices, then the count."""
    from fsct.predict import framed_maps
    from fsct.threshold import threshold_scores

    grid = val_thresholds(cfg)
    slices = val.slices
    idx = list(range(rank, len(slices), world)) if slices is not None else []
    if not idx:
        return torch.zeros(len(grid) + 1, dtype=torch.float64)
    dev = next(model.parameters()).device
    images = slices.images[idx]
    # the maps predict will cut (flip TTA or not), so the threshold chosen here is the one that fits them
    m = framed_maps(model, torch.from_numpy(images).to(dev), cfg.predict, cfg.data.image_size)
    voters = None if val.support is None else support_voters(model, *val.support, cfg.predict, cfg.data.image_size)
    scores = threshold_scores(m.prob, m.seen.cpu().numpy(), slices.masks[idx], cfg.predict, grid, m.emb, m.frames,
                              voters)
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

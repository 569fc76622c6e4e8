"""The training step, one definition for `fsct train` and `fsct bench train`: precision, optimizer, LR
schedule and one optimizer step through an Accelerator (which owns autocast, loss scaling, gradient
accumulation and, with several processes, DDP). Benchmarking this very step means a change to training is
measured as it is."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fsct import launch
from fsct.config import Config
from fsct.data.episodes import Batch


def resolve_precision(cfg: Config) -> str:
    """train.mixed_precision as Accelerate takes it: no | bf16 | fp16 (auto: see fsct.launch)."""
    return launch.resolve_precision(cfg.train.mixed_precision, torch.cuda.is_available())


def make_accelerator(cfg: Config, **kwargs: Any) -> Any:
    """An Accelerator with the config's precision and gradient accumulation (kwargs: log_with, cpu, ...)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_precision(cfg), gradient_accumulation_steps=cfg.optim.grad_accum,
                       **kwargs)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup then cosine to min_lr_ratio; a function of the step, so resuming needs no state."""
    o, total = cfg.optim, max(cfg.train.max_steps, 1)
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: nn.Module, cfg: Config, dev: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (one kernel for all parameters). With `optim.encoder_lr_mult`
    below 1, two parameter groups, the encoder's and the rest, each scaled by its `lr_mult` in `train_step`
    (one group otherwise, so checkpoints of either kind resume into the optimizer they were saved from)."""
    o = cfg.optim
    params: list = list(model.parameters())
    encoder = getattr(model, "encoder", None)
    if o.encoder_lr_mult != 1.0 and encoder is not None:
        enc = {id(p) for p in encoder.parameters()}
        params = [{"params": [p for p in params if id(p) in enc], "lr_mult": o.encoder_lr_mult},
                  {"params": [p for p in params if id(p) not in enc], "lr_mult": 1.0}]
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                             fused=o.fused and dev.type == "cuda")


@dataclass
class StepResult:
    lr: float
    terms: dict[str, torch.Tensor]  # the last micro-batch's loss terms (and logits)
    grad_norm: torch.Tensor | None  # before clipping; None without clipping


def train_step(acc: Any, model: nn.Module, opt: torch.optim.Optimizer, next_batch: Callable[[], Batch],
               step: int, cfg: Config) -> StepResult:
    """Optimizer step `step`: its learning rate, then grad_accum micro-batches (each from `next_batch`)
    under autocast, gradients clipped when they are synchronised, AdamW. `model` and `opt` come from
    `acc.prepare`. The loss is computed inside forward (q_lbl given), so DDP's gradient hooks see it all."""
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    terms: dict[str, torch.Tensor] = {}
    grad_norm = None
    for _ in range(cfg.optim.grad_accum):
        batch = next_batch()
        with acc.accumulate(model):
            with acc.autocast():
                terms = model(batch.s_img, batch.s_lbl, batch.q_img, batch.n_way, q_lbl=batch.q_lbl, raw=batch.raw)
            acc.backward(terms["loss"])
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) \
                if acc.sync_gradients and cfg.optim.grad_clip > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
    return StepResult(lr, terms, grad_norm)

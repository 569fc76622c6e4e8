"""Batched augmentation on whatever device the slices are on: one affine grid for the whole batch and
per-slice random parameters, so the GPU never waits on a CPU loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fsct.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _sharpen(img: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """img + amount * (img - gaussian_blur(img)) per slice: amount < 0 blurs (-1: the blur itself), > 0
    sharpens. Scanners and reconstruction kernels differ in sharpness from patient to patient; a boundary
    model must not learn one of them."""
    x = torch.arange(5, device=img.device, dtype=img.dtype) - 2
    k = torch.exp(-0.5 * x**2)
    k = k / k.sum()
    blur = F.conv2d(F.pad(img.unsqueeze(1), (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    blur = F.conv2d(F.pad(blur, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1)).squeeze(1)
    return img + amount.view(-1, 1, 1) * (img - blur)


def augment_batch(img: torch.Tensor, lbl: torch.Tensor, cfg: AugmentConfig,
                  g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """img (B,H,W) float in [0,1], lbl (B,H,W) long -> the same, with random affine + intensity changes.

    Labels move with the geometry (nearest sampling); pixels brought in from outside are background."""
    B, H, W = img.shape
    dev = img.device
    angle = _uniform(B, -cfg.rotate_deg, cfg.rotate_deg, g, dev) * (math.pi / 180)
    scale = _uniform(B, 1 - cfg.scale, 1 + cfg.scale, g, dev)
    tx = _uniform(B, -cfg.translate, cfg.translate, g, dev) * 2
    ty = _uniform(B, -cfg.translate, cfg.translate, g, dev) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)
    out = F.grid_sample(img.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(lbl.unsqueeze(1).float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False).squeeze(1).long()
    out = out.squeeze(1)
    if cfg.sharpness > 0:
        out = _sharpen(out, _uniform(B, -cfg.sharpness, cfg.sharpness, g, dev))
    gamma = _uniform(B, 1 - cfg.gamma, 1 + cfg.gamma, g, dev).view(B, 1, 1)
    contrast = _uniform(B, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(B, 1, 1)
    out = out.clamp(0, 1).pow(gamma)
    mean = out.mean(dim=(1, 2), keepdim=True)
    out = (out - mean) * contrast + mean
    if cfg.noise_std > 0:
        out = out + torch.randn(out.shape, generator=g, device=dev) * cfg.noise_std
    return out.clamp_(0, 1), lab

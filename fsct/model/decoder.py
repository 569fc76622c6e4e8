"""A light U-Net/FPN decoder: encoder stages at strides 2..32 -> per-pixel embeddings and a boundary map at
stride 2.

The top-down path upsamples, adds a 1x1 lateral projection of each finer stage (the skip connection) and
smooths with a 3x3 conv, so the output sees both the stride-32 context and the stride-2 edges. Two heads:
`embed` (linear, so cosine prototypes see signed features, as PANet's do) and `boundary` (a logit per pixel:
does a structure border pass here), which the learned partition cuts along.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    def __init__(self, channels: list[int], width: int, out_dim: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in channels])
        self.smooth = nn.ModuleList([_conv_bn_relu(width, width) for _ in channels[:-1]])
        self.embed = nn.Conv2d(width, out_dim, 1)
        self.boundary = nn.Sequential(_conv_bn_relu(width, width), nn.Conv2d(width, 1, 1))

    def forward(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """stages (finest first) -> embeddings (B, out_dim, h, w), boundary logits (B, h, w) at the finest
        stage's size."""
        x = self.lateral[-1](stages[-1])
        for i in range(len(stages) - 2, -1, -1):
            skip = stages[i]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[i](x + self.lateral[i](skip))
        return self.embed(x), self.boundary(x).squeeze(1)

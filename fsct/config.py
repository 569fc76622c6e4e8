"""Every setting of a run in one dataclass tree: YAML in, `key=value` overrides on the command line,
the resolved tree saved beside every run. Nothing reads settings from anywhere else."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsct.errors import FsctError


@dataclass
class DataConfig:
    shards: str = "shards/synth"  # directory written by `fsct shard` (holds index.json)
    train_split: str = "train"
    val_split: str = "val"
    unlabeled_split: str = "unlabeled"
    image_size: int = 256  # slices are resized to this square size for training
    num_workers: int = 0  # >0: episodes are built on the CPU in DataLoader workers
    cache_on_device: bool = True  # keep the decoded pool on the GPU (the whole train set is ~130 MB)


@dataclass
class EpisodeConfig:
    # Which episode kinds to draw, with weights: class (ids as classes across slices, the notebook's),
    # slice (ways = structures of one slice, two augmented views), superpixel (unlabelled slices).
    mode: str = "class"
    mix: dict[str, float] = field(default_factory=dict)  # e.g. {slice: 0.5, superpixel: 0.5}; overrides mode
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 5
    episodes_per_step: int = 1  # episodes stacked into one forward pass
    min_pixels: int = 64  # a structure smaller than this (at full size) is not a usable way


@dataclass
class AugmentConfig:
    enabled: bool = True
    rotate_deg: float = 15.0
    scale: float = 0.15  # zoom in [1-scale, 1+scale]
    translate: float = 0.08  # fraction of the image size
    gamma: float = 0.3  # intensity gamma in [1-gamma, 1+gamma]
    contrast: float = 0.15
    noise_std: float = 0.03
    sharpness: float = 0.0  # blur (< 0) or sharpen (> 0) each slice by up to this amount (unsharp mask, sigma 1)


@dataclass
class ModelConfig:
    variant: str = "panet"  # panet | seed (the notebook's model exactly: no bg prototype, T=1, no PAR)
    feature_dim: int = 256
    encoder: str = "resnet18"  # resnet18 | efficientnet_lite0 | timm/<name> (decoder unet only, except resnet18)
    decoder: str = "none"  # none (stride-8 fused features, the notebook's PANet) | unet (stride-2 + boundary head)
    decoder_dim: int = 64  # unet: channels of the top-down path
    pretrained: str = ""  # weights file (.safetensors/.pth) or, for timm/ encoders, a hub name; "" = scratch
    boundary_weight: float = 1.0  # unet: weight of the boundary head's loss (borders between label ids)
    scale: float = 20.0  # cosine similarity temperature (the paper's alpha)
    par_weight: float = 1.0  # prototype alignment regularisation weight
    channels_last: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    grad_clip: float = 1.0
    fused: bool = True  # fused AdamW where the device supports it


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 1000
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    log_every: int = 10
    val_every: int = 100
    val_episodes: int = 20
    val_seed: int = 1234
    best_metric: str = "val/miou"  # val/miou | val/miou_bg | val/ari_fg
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    save_every: int = 200
    keep_checkpoints: int = 2
    val_slices: int = 8  # dense models: val slices partitioned and scored on the official metric (val/ari_fg)
    tune_threshold: bool = True  # dense models: predict.boundary_threshold chosen on those slices, saved with the model
    image_every: int = 100  # W&B panel of query predictions every this many steps; 0 = never
    tracker: str = "none"  # none | wandb
    project: str = "fsct"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PredictConfig:
    mode: str = "class"  # class (argmax over support classes + bg) | partition (unexplained fg split apart)
    k_shot: int = 5  # support slices per class
    batch_size: int = 16
    tta_flip: bool = False
    seed: int = 0
    unexplained_threshold: float = 0.5  # partition: best softmax probability under which a pixel is unexplained
    min_region: int = 64  # partition: regions smaller than this (pixels at 512x512) are merged
    partition_split: str = "group"  # partition: learned | group | superpixels | components (fsct/partition.py)
    boundary_threshold: float = 0.5  # learned: cells with boundary probability under this seed regions
    sp_scale: float = 30.0  # partition: Felzenszwalb scale of those superpixels (larger: fewer, bigger)
    glue_cosine: float = 0.0  # partition group: glue neighbour superpixels with embedding cosine >= this (0 off)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return _plain(d)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or fail naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            if origin is tuple:
                return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
            return [_coerce(args[0], v, where) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): _coerce(args[1], v, where) for k, v in value.items()}
    except (TypeError, ValueError) as e:
        raise FsctError(f"config: {where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from e
    return value


def _update(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise FsctError(f"{source}: unknown config key '{where}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FsctError(f"{source}: '{where}' is a section, not a value")
            _update(current, value, f"{where}.", source)
        else:
            setattr(obj, key, _coerce(hints[key], value, where))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 a.c=x` -> {"a": {"b": 1, "c": "x"}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise FsctError(f"override '{item}' is not key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the command-line overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FsctError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise FsctError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(values, dict):
            raise FsctError(f"{path}: expected a mapping of config sections")
        _update(cfg, values, "", str(path))
    if overrides:
        _update(cfg, parse_overrides(overrides), "", "command line")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

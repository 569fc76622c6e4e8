"""Every setting of a run in one dataclass tree: YAML in, `key=value` overrides on the command line,
the resolved tree saved beside every run. Nothing reads settings from anywhere else."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fsct.errors import FsctError


@dataclass
class DataConfig:
    shards: str = "shards/synth"  # directory written by `fsct shard` (holds index.json)
    train_split: str = "train"
    val_split: str = "val"
    unlabeled_split: str = "unlabeled"
    image_size: int = 256  # slices are resized to this square size for training
    num_workers: int = 0  # >0: memory: episodes are built on the CPU in workers; stream: slices are decoded there
    cache_on_device: bool = True  # keep the decoded pool (or the stream's buffer) on the GPU
    # memory: each rank decodes its share of the shards into memory (right for the challenge's ~130 MB);
    # stream: each rank streams its shards through a buffer of buffer_slices slices (docs/SCALING.md)
    loader: Literal["memory", "stream"] = "memory"
    buffer_slices: int = 512  # stream: slices held per rank (and per split), episodes are drawn from them
    slice_uses: int = 4  # stream: steps that draw a buffered slice before it makes room (decodes per use: 1/4)


@dataclass
class EpisodeConfig:
    # Which episode kinds to draw, with weights: class (ids as classes across slices, the notebook's),
    # slice (ways = structures of one slice, two augmented views), superpixel (unlabelled slices).
    mode: Literal["class", "slice", "superpixel"] = "class"
    # e.g. {slice: 0.5, superpixel: 0.5}; overrides mode
    mix: dict[Literal["class", "slice", "superpixel"], float] = field(default_factory=dict)
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 5
    episodes_per_step: int = 1  # episodes stacked into one forward pass
    min_pixels: int = 64  # a structure smaller than this (at full size) is not a usable way

    @property
    def effective_mix(self) -> dict[str, float]:
        """The episode kinds drawn, with their weights: `mix`, or else `mode` alone."""
        return dict(self.mix) if self.mix else {self.mode: 1.0}


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
    # seed: the notebook's model exactly (no bg prototype, T=1, no PAR)
    variant: Literal["panet", "seed"] = "panet"
    feature_dim: int = 256
    encoder: str = "resnet18"  # resnet18 | efficientnet_lite0 | timm/<name> (decoder unet only, except resnet18)
    # none: stride-8 fused features (the notebook's PANet); unet: stride-2 embeddings + boundary head
    decoder: Literal["none", "unet"] = "none"
    decoder_dim: int = 64  # unet: channels of the top-down path
    pretrained: str = ""  # weights file (.safetensors/.pth) or, for timm/ encoders, a hub name; "" = scratch
    boundary_weight: float = 1.0  # unet: weight of the boundary head's loss (borders between label ids)
    # unet: weigh border and inside cells equally in the boundary loss (HED's class balance); plain BCE
    # leaves the rare border cells near 0.5, so the partition's threshold has no margin
    boundary_balanced: bool = False
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
    # the encoder's learning rate as a fraction of lr (1 = one rate for all): below 1, a pretrained encoder
    # keeps more of its natural-image features while the decoder and heads learn at the full rate
    encoder_lr_mult: float = 1.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    fused: bool = True  # fused AdamW where the device supports it


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 1000
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16 | fp16
    log_every: int = 10
    val_every: int = 100
    val_episodes: int = 20
    val_seed: int = 1234
    best_metric: Literal["val/miou", "val/miou_bg", "val/ari_fg"] = "val/miou"
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    save_every: int = 200
    keep_checkpoints: int = 2
    # > 0: validation, best/ and the model file use a moving average of the weights with this decay per step
    # (fsct/ema.py); each checkpoint also holds it as ema.safetensors. 0 = the trained weights themselves
    ema_decay: float = 0.0
    val_slices: int = 8  # dense models: val slices partitioned and scored on the official metric (val/ari_fg)
    tune_threshold: bool = True  # dense models: predict.boundary_threshold chosen on val, saved with the model
    # dense models: predict.min_regions = the median number of structures (>= predict.min_region pixels) of
    # a labelled train slice (the shards' index), saved with the model
    region_floor: bool = True
    # dense models: predict.body_size = the median body size of the train split's first 64 slices, saved with
    # the model
    body_scale: bool = True
    # W&B panel of query predictions at the first validation at least this many steps after the last; 0 = never
    image_every: int = 100
    tracker: Literal["none", "wandb", "tensorboard", "mlflow"] = "none"  # accelerate's log_with
    log_model: bool = False  # wandb: log the best model (model.safetensors + config.yaml) as an artifact
    project: str = "fsct"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PredictConfig:
    mode: Literal["class", "partition"] = "class"
    # class: argmax over support classes + bg; partition: unexplained foreground split apart
    k_shot: int = 5  # support slices per class
    batch_size: int = 16
    # average the maps with those of the mirrored slice; dense models: set it in the training config, whose
    # validation chooses boundary_threshold on the same maps
    tta_flip: bool = False
    seed: int = 0
    unexplained_threshold: float = 0.5  # partition: best softmax probability under which a pixel is unexplained
    min_region: int = 64  # partition: regions smaller than this (pixels at 512x512) are merged
    # partition: boundary | learned (dense models) | group | superpixels | components (see fsct/partition.py)
    partition_split: Literal["boundary", "learned", "group", "superpixels", "components"] = "group"
    # boundary/learned: regions stay apart where the merge cost is at or above this (the border's mean
    # probability; for learned with embedding_weight > 0, the weighted cost below)
    boundary_threshold: float = 0.5
    # learned: weight of the embedding distance (1 - cosine of two regions' mean embeddings) in the merge cost,
    # beside (1 - weight) x the pooled border's mean probability; 0 = the border alone
    embedding_weight: float = 0.0
    # learned: weight w of the support slices' vote (fsct/vote.py): the merge cost becomes (1 - w) x the cost
    # above + w x (1 - how often a labelled support slice calls both regions the same structure); 0 = off.
    # Up to vote_slices labelled slices of the support's split vote, evenly spread over its keys.
    support_vote: float = 0.0
    vote_slices: int = 32
    # boundary/learned: a slice cut into fewer regions than this is cut again at the next lower threshold of
    # fsct.threshold.GRID, until it has as many (0 = no floor). Training sets it (train.region_floor).
    min_regions: int = 0
    # boundary/learned: the training slices' median body size (sqrt of the body's share of the slice); a slice
    # whose body is smaller than it by more than the fraction body_tolerance (the default augment.scale: the
    # zooms training has seen) is partitioned through a window that shows its body at that size, and mapped
    # back (fsct/body_scale.py). Training sets body_size (train.body_scale); 0 = every slice as it is.
    body_size: float = 0.0
    body_tolerance: float = 0.15
    # learned: torch = batched tensor ops on the model's device (fsct/partition_torch.py); numpy = one slice
    # at a time on the CPU; the same partition either way; auto = torch on a GPU, numpy on a CPU (faster there)
    partition_ops: Literal["auto", "numpy", "torch"] = "auto"
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
    if origin is Literal:
        if value in args:
            return value
        raise FsctError(f"config: {where}={value!r} is not one of {' | '.join(map(str, args))}"
                        + _did_you_mean(str(value), [str(a) for a in args]))
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
            if _is_unspaced_flow_mapping(value):
                # YAML reads `{slice:0.5}` as a key "slice:0.5" with no value: say how to write it
                raise FsctError(f"config: {where}: write a mapping with a space after each colon, quoted on a "
                                f"command line: {where}='{{slice: 0.5, superpixel: 0.5}}'")
            if not isinstance(value, dict):
                raise ValueError(value)
            return {_coerce(args[0], k, f"{where} key"): _coerce(args[1], v, f"{where}.{k}")
                    for k, v in value.items()}
    except (TypeError, ValueError) as e:
        raise FsctError(f"config: {where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from e
    return value


def check_choices(section: Any, prefix: str) -> None:
    """The Literal-typed fields of a config section built in code (load_config checks them as it reads)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if typing.get_origin(hints[f.name]) is Literal:
            _coerce(hints[f.name], getattr(section, f.name), f"{prefix}.{f.name}")


def _is_unspaced_flow_mapping(value: Any) -> bool:
    return isinstance(value, dict) and any(v is None and ":" in str(k) for k, v in value.items())


def _did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _update(obj: Any, values: dict[str, Any], prefix: str, source: str, origins: dict[str, str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise FsctError(f"{source}: unknown config key '{where}'" + _did_you_mean(key, sorted(names), prefix)
                            + f" (known in {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FsctError(f"{source}: '{where}' is a section, not a value")
            _update(current, value, f"{where}.", source, origins)
        else:
            try:
                setattr(obj, key, _coerce(hints[key], value, where))
            except FsctError as e:  # name the file (or "command line") the bad value came from
                raise FsctError(f"{source}: {str(e).removeprefix('config: ')}") from None
            origins[where] = source


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


def _multiple_of_32(v: int) -> bool:
    return v > 0 and v % 32 == 0  # the encoder downsamples by 32


# Ranges checked at load, before anything is written: "section.key" -> (ok, what it must be). A key missing
# from a config section (a field another branch removed) is skipped, so the table never blocks a merge.
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.image_size": (_multiple_of_32, "a positive multiple of 32"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.buffer_slices": (lambda v: v >= 2, ">= 2 (a support and a query slice)"),
    "data.slice_uses": (lambda v: v >= 1, ">= 1"),
    "episodes.n_way": (lambda v: v >= 1, ">= 1"),
    "episodes.k_shot": (lambda v: v >= 1, ">= 1"),
    "episodes.n_query": (lambda v: v >= 1, ">= 1"),
    "episodes.episodes_per_step": (lambda v: v >= 1, ">= 1"),
    "episodes.min_pixels": (lambda v: v >= 0, ">= 0"),
    "episodes.mix": (lambda v: all(w >= 0 for w in v.values()) and (not v or sum(v.values()) > 0),
                     "weights >= 0 with a positive sum"),
    "augment.scale": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.gamma": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "augment.noise_std": (lambda v: v >= 0, ">= 0"),
    "model.feature_dim": (lambda v: v >= 1, ">= 1"),
    "model.scale": (lambda v: v > 0, "> 0"),
    "model.par_weight": (lambda v: v >= 0, ">= 0"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.encoder_lr_mult": (lambda v: 0 <= v <= 1, "in [0, 1] (0: a frozen encoder)"),
    "optim.grad_accum": (lambda v: v >= 1, ">= 1"),
    "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.val_every": (lambda v: v >= 0, ">= 0"),
    "train.val_episodes": (lambda v: v >= 1, ">= 1"),
    "train.patience": (lambda v: v >= 0, ">= 0"),
    "train.save_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.image_every": (lambda v: v >= 0, ">= 0 (0: never)"),
    "predict.k_shot": (lambda v: v >= 1, ">= 1"),
    "predict.batch_size": (lambda v: v >= 1, ">= 1"),
    "predict.unexplained_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "predict.min_region": (lambda v: v >= 0, ">= 0"),
    "predict.sp_scale": (lambda v: v > 0, "> 0"),
    "predict.boundary_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "predict.min_regions": (lambda v: 0 <= v <= 255, "in [0, 255] (0: no floor)"),
    "predict.body_size": (lambda v: 0 <= v <= 1, "in [0, 1] (0: every slice as it is)"),
    "predict.body_tolerance": (lambda v: v >= 0, ">= 0"),
    "model.decoder_dim": (lambda v: v >= 1, ">= 1"),
    "model.boundary_weight": (lambda v: v >= 0, ">= 0"),
    "augment.sharpness": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.val_slices": (lambda v: v >= 0, ">= 0"),
}


def validate(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Fail with one line naming the source (YAML file, "command line" or defaults) and the key."""
    origins = origins or {}
    for where, (ok, must) in RANGES.items():
        section, key = where.split(".")
        node = getattr(cfg, section)
        if not hasattr(node, key):
            continue
        value = getattr(node, key)
        if not ok(value):
            raise FsctError(f"{origins.get(where, 'defaults')}: {where}={value!r} must be {must}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the command-line overrides; types, choices and ranges checked."""
    cfg = Config()
    origins: dict[str, str] = {}
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
        _update(cfg, values, "", str(path), origins)
    if overrides:
        _update(cfg, parse_overrides(overrides), "", "command line", origins)
    validate(cfg, origins)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

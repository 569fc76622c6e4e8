"""`fsct bench train|predict`: how fast fsct trains and predicts on this machine, against the seed notebook.

train, in one process on one device (cuda when there is one, else cpu):
  model_only   fsct's train step on synthetic tensors, with the config's settings (autocast precision,
               channels_last, torch.compile, fused AdamW, episodes_per_step episodes per forward)
  end_to_end   the same step fed by the trainer's own batches (`load_train_data(...).batches`: the config's
               data.loader, memory (episode sampler, device-side pool) or stream (shards read through a
               buffer), augmentation on the device) from shards; `--compare-loaders` times both loaders,
               `--slices N` grows the synthetic train split to N slices so the stream goes through real tars.
               `loader_share` is the part of the timed seconds spent getting batches (host time: on a GPU
               the device work it queues is not in it)
  seed         the seed notebook's model-only step (`--seed-baseline`, by default the in-repo copy
               tests/fixtures/seed_baseline.py, its `cmd_bench`): one episode of the same shape per step,
               fp32, Adam
Both fsct measurements run `fsct.engine.train_step`, the trainer's own step, through a single-process
Accelerator: a change to training is measured as it is.
predict: slices/s of `fsct predict`'s work: support prototypes once, then batches of 512x512 uint8 slices
through `predict_batch` (resize, features, cosine logits, upsampling to 512, argmax, copy to the host); for a
dense model predicting the learned partition, the support vote's prototypes once (with predict.support_vote),
then `learned_masks` (maps, basins, flood, merges, 512 px ids on the host), with `--compare-partition-ops`
once on the CPU path and once as batched torch ops.

FLOPs of one episode are counted by torch's FlopCounterMode on an eager copy of the model (forward and
backward; it counts convolutions and matrix products, which are nearly all of the work). Timings drain the
device (torch.cuda.synchronize) before the clock starts and before it stops. CPU numbers only show that the
tool works; the target is one H100 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from fsct.atomic import atomic_file
from fsct.checkpoint import load_model, save_model
from fsct.config import Config, PredictConfig, load_config
from fsct.engine import make_accelerator, make_optimizer, resolve_precision, train_step
from fsct.errors import FsctError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path("configs/panet_5w5s.yaml")
SEED_BASELINE = REPO / "tests" / "fixtures" / "seed_baseline.py"  # the seed notebook's model as a script

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name();
# the first match wins, so the PCIe H100 comes before the generic (SXM) entry.
BF16_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
)


# --- devices and timing -----------------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FsctError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_peak_tflops(name: str) -> float | None:
    """The GPU's dense bf16 peak from the table above; None for a CPU or a GPU not in it."""
    upper = name.upper()
    for needles, peak in BF16_PEAK_TFLOPS:
        if all(n in upper for n in needles):
            return peak
    return None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def time_steps(step: Callable[[], object], warmup: int, steps: int, dev: torch.device) -> float:
    """Seconds for `steps` calls after `warmup` untimed ones, with the device drained at both ends (CUDA
    runs asynchronously: without the syncs the clock would stop before the work does)."""
    for _ in range(warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return time.perf_counter() - t0


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (forward and backward if fn runs both)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# --- results ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """One measurement: `items` episodes (train) or slices (predict) in `seconds`."""

    name: str
    items: int
    seconds: float
    slices_per_item: float
    flops_per_item: float | None = None
    peak_mem_gb: float | None = None
    extra: dict[str, Any] | None = None

    @property
    def per_s(self) -> float:
        return self.items / self.seconds

    def summary(self, peak_tflops: float | None, seed_per_s: float | None, unit: str) -> dict[str, Any]:
        """unit: "episode" or "slice" (what one item is)."""
        out: dict[str, Any] = {
            f"{unit}s_per_s": self.per_s,
            "slices_per_s": self.per_s * self.slices_per_item,
            f"ms_per_{unit}": 1000 * self.seconds / self.items,
            "timed": self.items,
            "seconds": self.seconds,
            "ratio_to_seed": self.per_s / seed_per_s if seed_per_s else None,
            f"flops_per_{unit}": self.flops_per_item,
            "tflops": None,
            "fraction_of_bf16_peak": None,
            "peak_mem_gb": self.peak_mem_gb,
        }
        if self.flops_per_item is not None:
            tflops = self.flops_per_item * self.per_s / 1e12
            out.update(tflops=tflops, fraction_of_bf16_peak=tflops / peak_tflops if peak_tflops else None)
        out.update(self.extra or {})
        return out


def environment(dev: torch.device) -> dict[str, Any]:
    name = device_name(dev)
    return {"device": str(dev), "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "peak_bf16_tflops": bf16_peak_tflops(name) if dev.type == "cuda" else None}


def write_json(path: Path, result: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")


TRAIN_COLUMNS = (("episodes/s", "episodes_per_s", ".2f"), ("slices/s", "slices_per_s", ".1f"),
                 ("x seed", "ratio_to_seed", ".2f"), ("x memory", "ratio_to_memory", ".2f"),
                 ("loader share", "loader_share", ".1%"), ("TFLOP/s", "tflops", ".3f"),
                 ("of bf16 peak", "fraction_of_bf16_peak", ".1%"), ("peak GB", "peak_mem_gb", ".2f"))
PREDICT_COLUMNS = (("slices/s", "slices_per_s", ".1f"), ("ms/slice", "ms_per_slice", ".2f"),
                   ("prototypes s", "prototype_s", ".3f"), ("peak GB", "peak_mem_gb", ".2f"))


def print_table(title: str, rows: dict[str, dict[str, Any]],
                columns: tuple[tuple[str, str, str], ...]) -> None:
    """rows: measurement -> result; columns: (header, result key, format spec); None prints as '-'."""
    from rich.console import Console
    from rich.table import Table

    from fsct.progress import is_terminal

    table = Table(title=title)
    table.add_column("measurement", no_wrap=True)
    for header, _, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for name, r in rows.items():
        table.add_row(name, *("-" if r.get(k) is None else format(r[k], spec) for _, k, spec in columns))
    # a log file has no width: do not squeeze the table into 80 columns there
    Console(width=None if is_terminal() else 120).print(table)


# --- shards for a run without --shards --------------------------------------------------------------------

def synthetic_shards(work: Path, cfg: Config, n_test: int = 4, per_class: int | None = None) -> Path:
    """A small `fsct synth` + `fsct shard` set under `work` with enough slices per class for the config's
    episodes (or for `per_class` slices per class), and an unlabelled split with superpixels when the
    config draws superpixel episodes."""
    from fsct.data.shards import shard_dataset
    from fsct.data.synth import SynthSettings, write_synth

    e = cfg.episodes
    superpixels = "superpixel" in e.effective_mix
    # Semantic synth ids: the common structures show on nearly every slice, so twice the episode's need
    # leaves enough slices per way.
    labelled = max(8, 2 * (per_class or e.k_shot + e.n_query) + 2)
    n_train = labelled + (6 if superpixels else 0)
    data = write_synth(work / "data", SynthSettings(seed=0, n_train=n_train, n_test=n_test,
                                                    labelled_fraction=labelled / n_train), progress=False)
    out = work / "shards"
    shard_dataset(data / "X_train" / "images", data / "Y_train.csv", out, val_fraction=0.0,
                  superpixels=superpixels, workers=1, progress=False)
    shard_dataset(data / "X_test" / "images", None, out, split="test", workers=1, progress=False)
    return out


def grown_shards(shards: Path, out: Path, cfg: Config, n: int) -> Path:
    """`shards` with its train split (and the unlabelled one, for superpixel episodes) grown to n slices."""
    from fsct.data.pool import read_index
    from fsct.data.shards import grow_splits

    splits = [cfg.data.train_split] + (
        [cfg.data.unlabeled_split] if "superpixel" in cfg.episodes.effective_mix else [])
    have = read_index(shards)["splits"]
    grow_splits(shards, out, {s: n for s in splits if s in have}, shard_size=64)
    return out


# --- train ------------------------------------------------------------------------------------------------

def precision_name(cfg: Config) -> str:
    """The step's precision as the results name it: fp32, bf16 or fp16."""
    mp = resolve_precision(cfg)
    return "fp32" if mp == "no" else mp


def autocast(dev: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to dtype, or nothing at all for fp32 (as Accelerate does with mixed_precision=no)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(dev.type, dtype=dtype)


def bench_accelerator(cfg: Config, dev: torch.device) -> Any:
    """One process on `dev`, with the config's precision and gradient accumulation, as `fsct train` has."""
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return make_accelerator(cfg, cpu=dev.type == "cpu")


def synthetic_batch(cfg: Config, dev: torch.device, seed: int = 0):
    """Random images and labels of one step's shape: (E, support | query, 1, H, W) (see episode_shape)."""
    from fsct.data.episodes import Batch

    e, size = cfg.episodes, cfg.data.image_size
    g = torch.Generator().manual_seed(seed)
    (n_s, n_q), eps = episode_shape(cfg), e.episodes_per_step
    return Batch(torch.randn(eps, n_s, 1, size, size, generator=g),
                 torch.randint(0, e.n_way + 1, (eps, n_s, size, size), generator=g),
                 torch.randn(eps, n_q, 1, size, size, generator=g),
                 torch.randint(0, e.n_way + 1, (eps, n_q, size, size), generator=g), e.n_way).to(dev)


def episode_shape(cfg: Config) -> tuple[int, int]:
    """(support, query) slices of one episode: class episodes have K and Q slices per way (the notebook's
    shape, used whenever class episodes are drawn at all); slice and superpixel episodes are K and Q views
    of one slice."""
    e = cfg.episodes
    if "class" in e.effective_mix:
        return e.n_way * e.k_shot, e.n_way * e.n_query
    return e.k_shot, e.n_query


def episode_slices(cfg: Config) -> int:
    return sum(episode_shape(cfg))


def fsct_step_flops(acc: Any, cfg: Config, dev: torch.device) -> float:
    """FLOPs of one episode's forward + backward, counted on an eager model (compile changes no FLOPs)."""
    from fsct.model.panet import PANet

    model = PANet(replace(cfg.model, compile=False)).to(dev)
    one = replace(cfg, episodes=replace(cfg.episodes, episodes_per_step=1))
    b = synthetic_batch(one, dev)

    def fwd_bwd() -> None:
        with acc.autocast():
            loss = model(b.s_img, b.s_lbl, b.q_img, b.n_way, q_lbl=b.q_lbl, raw=b.raw)["loss"]
        loss.backward()

    return count_flops(fwd_bwd)


def time_train_steps(acc: Any, model: nn.Module, opt: torch.optim.Optimizer, next_batch: Callable[[], Any],
                     cfg: Config, warmup: int, steps: int, dev: torch.device) -> float:
    """Seconds for `steps` calls of the trainer's step (after `warmup`), with its lr schedule from step 0."""
    counter = iter(range(1 << 40))
    return time_steps(lambda: train_step(acc, model, opt, next_batch, next(counter), cfg), warmup, steps, dev)


def bench_model_only(acc: Any, cfg: Config, dev: torch.device, warmup: int, steps: int, name: str,
                     flops: float | None) -> tuple[Timing, nn.Module, torch.optim.Optimizer]:
    from fsct.model.panet import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dev).train()
    model, opt = acc.prepare(model, make_optimizer(model, cfg, dev))
    batch = synthetic_batch(cfg, dev)
    reset_memory(dev)
    seconds = time_train_steps(acc, model, opt, lambda: batch, cfg, warmup, steps, dev)
    eps = steps * cfg.episodes.episodes_per_step * cfg.optim.grad_accum
    return Timing(name, eps, seconds, episode_slices(cfg), flops, peak_memory_gb(dev)), model, opt


def bench_end_to_end(acc: Any, cfg: Config, dev: torch.device, warmup: int, steps: int, shards: Path,
                     model: nn.Module, opt: torch.optim.Optimizer, flops: float | None,
                     name: str = "end_to_end") -> Timing:
    """The trainer's data path (`load_train_data(...).batches`) feeding the same step; loading the pool (or
    opening the stream) is reported, not timed."""
    from fsct.data.episodes import load_train_data

    cfg = replace(cfg, data=replace(cfg.data, shards=str(shards)),
                  train=replace(cfg.train, max_steps=warmup + steps))
    t0 = time.perf_counter()
    data = load_train_data(cfg, 0, 1)
    load_s = time.perf_counter() - t0
    batches: Iterator = data.batches(cfg, 0, dev)
    slices: list[int] = []  # per micro-batch: a mix of episode modes draws episodes of different sizes
    waits: list[float] = []  # per micro-batch: host seconds spent getting it

    def next_batch():
        t = time.perf_counter()
        b = next(batches)[1]
        waits.append(time.perf_counter() - t)
        slices.append(b.s_img.shape[0] * (b.s_img.shape[1] + b.q_img.shape[1]))
        return b

    reset_memory(dev)
    seconds = time_train_steps(acc, model, opt, next_batch, cfg, warmup, steps, dev)
    micro = steps * cfg.optim.grad_accum
    eps = micro * cfg.episodes.episodes_per_step
    per_episode = sum(slices[-micro:]) / eps
    # FLOPs grow with the slices encoded (the encoder is nearly all of them): scale the counted episode's
    flops = None if flops is None else flops * per_episode / episode_slices(cfg)
    loader_s = sum(waits[-micro:])
    extra = {"loader": cfg.data.loader, "pool_slices": len(data.share_keys), "pool_load_s": load_s,
             "buffer_slices": cfg.data.buffer_slices if cfg.data.loader == "stream" else None,
             "num_workers": cfg.data.num_workers, "loader_s": loader_s, "loader_share": loader_s / seconds}
    return Timing(name, eps, seconds, per_episode, flops, peak_memory_gb(dev), extra)


def find_seed_baseline(explicit: Path | None) -> Path | None:
    """--seed-baseline, else the repo's copy (SEED_BASELINE; absent from an installed package: None)."""
    if explicit is not None:
        if not explicit.is_file():
            raise FsctError(f"{explicit}: seed baseline script not found")
        return explicit
    return SEED_BASELINE if SEED_BASELINE.is_file() else None


def import_seed(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsct_bench_seed_baseline", path)
    if spec is None or spec.loader is None:
        raise FsctError(f"{path}: cannot import the seed baseline")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # its own imports (pandas, PIL) or a syntax error: say which file
        raise FsctError(f"{path}: cannot import the seed baseline ({type(e).__name__}: {e})") from e
    if not hasattr(module, "PANet"):
        raise FsctError(f"{path}: no PANet class (not the seed baseline?)")
    return module


def bench_seed(path: Path, cfg: Config, dev: torch.device, warmup: int, steps: int) -> Timing:
    """The notebook's `cmd_bench`: its PANet, Adam, fp32, one episode per step on random tensors."""
    seed = import_seed(path)
    e, size = cfg.episodes, cfg.data.image_size
    torch.manual_seed(0)
    model = seed.PANet(feature_dim=cfg.model.feature_dim).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n_s, n_q = e.n_way * e.k_shot, e.n_way * e.n_query  # its class episodes, whatever fsct's mode
    s = torch.randn(n_s, 1, size, size, device=dev)
    q = torch.randn(n_q, 1, size, size, device=dev)
    sm = torch.randint(0, e.n_way + 1, (n_s, size, size), device=dev)
    qm = torch.randint(0, e.n_way + 1, (n_q, size, size), device=dev)
    cls = list(range(1, e.n_way + 1))

    def fwd_bwd() -> None:
        loss, _, _ = model(s, sm, q, qm, cls)
        loss.backward()

    def step() -> None:
        opt.zero_grad()
        fwd_bwd()
        opt.step()

    flops = count_flops(fwd_bwd)
    opt.zero_grad()
    reset_memory(dev)
    seconds = time_steps(step, warmup, steps, dev)
    return Timing("seed", steps, seconds, n_s + n_q, flops, peak_memory_gb(dev),
                  {"script": str(path)})


def resolve_config_path(path: Path | None) -> Path:
    """The default config is found from the repo too, so `fsct bench` works from any directory."""
    if path is not None:
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else REPO / DEFAULT_CONFIG


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.steps < 1 or args.warmup < 0 or args.slices < 0:
        raise FsctError(f"--steps {args.steps} / --warmup {args.warmup} / --slices {args.slices}: need steps >= 1, "
                        "warmup >= 0 and slices >= 0")
    dev = pick_device(args.device)
    env = environment(dev)
    seed_path = None if args.no_seed else find_seed_baseline(args.seed_baseline)
    acc = bench_accelerator(cfg, dev)
    flops = fsct_step_flops(acc, cfg, dev) if not args.no_flops else None

    timings: list[Timing] = []
    compiles = [False, True] if args.compare_compile else [cfg.model.compile]
    kept: tuple[nn.Module, torch.optim.Optimizer] | None = None
    for compile_ in compiles:
        c = replace(cfg, model=replace(cfg.model, compile=compile_))
        name = f"model_only ({'compiled' if compile_ else 'eager'})" if args.compare_compile else "model_only"
        t, model, opt = bench_model_only(acc, c, dev, args.warmup, args.steps, name, flops)
        timings.append(t)
        if compile_ == cfg.model.compile:
            kept = (model, opt)  # end_to_end reuses the config's variant (compiled once)
        del model, opt
        acc.free_memory()  # the Accelerator's own references: a dropped variant's memory is freed
    assert kept is not None
    with tempfile.TemporaryDirectory(prefix="fsct-bench-") as tmp:
        shards = args.shards if args.shards is not None else synthetic_shards(Path(tmp), cfg)
        if args.slices:
            shards = grown_shards(shards, Path(tmp) / "grown", cfg, args.slices)
        loaders = ["memory", "stream"] if args.compare_loaders else [cfg.data.loader]
        for loader in loaders:
            c = replace(cfg, data=replace(cfg.data, loader=loader))
            name = f"end_to_end ({loader})" if args.compare_loaders else "end_to_end"
            timings.append(bench_end_to_end(acc, c, dev, args.warmup, args.steps, shards, *kept, flops, name))
    del kept
    if args.compare_loaders:
        memory, stream = timings[-2:]
        stream.extra["ratio_to_memory"] = stream.per_s / memory.per_s
    seed_note = "skipped (--no-seed)" if args.no_seed else "not found"
    if seed_path is not None:
        timings.append(bench_seed(seed_path, cfg, dev, args.warmup, args.steps))
        seed_note = str(seed_path)

    seed_t = next((t for t in timings if t.name == "seed"), None)
    seed_per_s = seed_t.per_s if seed_t else None
    rows = {t.name: t.summary(env["peak_bf16_tflops"], None if t is seed_t else seed_per_s, "episode")
            for t in timings}
    e = cfg.episodes
    return {
        "what": "fsct bench train",
        **env,
        "settings": {
            "config": str(args.config or resolve_config_path(None)), "overrides": list(args.overrides),
            "variant": cfg.model.variant, "n_way": e.n_way, "k_shot": e.k_shot, "n_query": e.n_query,
            "episodes_per_step": e.episodes_per_step, "grad_accum": cfg.optim.grad_accum,
            "image_size": cfg.data.image_size, "feature_dim": cfg.model.feature_dim,
            "precision": precision_name(cfg),
            "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
            "fused_adamw": cfg.optim.fused and dev.type == "cuda", "episode_mode": e.mix or e.mode,
            "augment": cfg.augment.enabled, "cache_on_device": cfg.data.cache_on_device,
            "num_workers": cfg.data.num_workers, "steps": args.steps, "warmup": args.warmup,
            "seed_baseline": seed_note, "shards": str(args.shards) if args.shards else "synthetic",
            "loader": "memory and stream" if args.compare_loaders else cfg.data.loader,
            "buffer_slices": cfg.data.buffer_slices, "slices": args.slices,
        },
        "flops_note": "FlopCounterMode: conv + matmul FLOPs of one episode, forward and backward "
                      "(end_to_end: scaled to the slices its episodes actually held)",
        "results": rows,
    }


# --- predict ----------------------------------------------------------------------------------------------

def fresh_checkpoint(cfg: Config, folder: Path) -> Path:
    """A randomly initialised model saved as `fsct train` saves one (speed does not depend on the weights)."""
    from fsct.model.panet import PANet

    torch.manual_seed(cfg.train.seed)
    save_model(PANet(replace(cfg.model, compile=False)), cfg, folder)
    return folder


def bench_predict(args: argparse.Namespace) -> dict[str, Any]:
    from fsct.data.pool import load_split, read_index
    from fsct.predict import learned_masks, model_draws_partition, predict_batch, support_prototypes
    from fsct.vote import load_voter_slices, support_voters, vote_on

    if args.slices < 1 or args.warmup < 0:
        raise FsctError(f"--slices {args.slices} / --warmup {args.warmup}: need slices >= 1 and warmup >= 0")
    dev = pick_device(args.device)
    env = environment(dev)
    with tempfile.TemporaryDirectory(prefix="fsct-bench-") as tmp:
        if args.checkpoint is None:
            fresh = load_config(resolve_config_path(args.config), args.overrides)
            ckpt = fresh_checkpoint(fresh, Path(tmp) / "model")
        else:
            ckpt = args.checkpoint
        model, cfg = load_model(ckpt, args.overrides)
        model.to(dev)
        # A dense model predicting the learned partition needs no prototypes: `fsct predict` runs learned_masks.
        learned = model_draws_partition(cfg.predict) and model.dense_head
        if args.shards is not None:
            shards = args.shards
        else:
            shards = synthetic_shards(Path(tmp), cfg, per_class=cfg.predict.k_shot)
        splits = read_index(shards)["splits"]
        q_split = args.images_split if args.images_split in splits else cfg.data.train_split
        support = None if learned else load_split(shards, args.support_split, size=cfg.data.image_size)
        # the learned partition's support vote (predict.support_vote): its slices' prototypes once, as `fsct
        # predict` makes them, timed with the class models' prototypes
        vote = learned and vote_on(cfg.predict)
        voting = load_voter_slices(shards, args.support_split, cfg.predict.vote_slices) if vote else None
        queries = load_split(shards, q_split)  # full size: what `fsct predict` reads
    # More slices than the split holds: the same ones again (speed does not depend on which).
    order = np.arange(args.slices) % len(queries)
    bs = cfg.predict.batch_size
    batches = [np.ascontiguousarray(queries.images[order[i:i + bs]]) for i in range(0, args.slices, bs)]
    dtype = {"no": None, "bf16": torch.bfloat16}[args.mixed_precision]

    def run_all(n_batches: int, pcfg: PredictConfig) -> float:
        """Prototypes (class models), then n batches; returns the prototype seconds."""
        t0 = time.perf_counter()
        if learned:
            voters, proto_s = None, 0.0
            if voting is not None:
                voters = support_voters(model, *voting, pcfg, cfg.data.image_size)
                sync(dev)
                proto_s = time.perf_counter() - t0
            for b in batches[:n_batches]:
                learned_masks(model, torch.from_numpy(b).to(dev), pcfg, cfg.data.image_size, voters)
            return proto_s
        protos = support_prototypes(model, support, pcfg, dev)
        protos.protos = protos.protos.to(dev)
        sync(dev)
        proto_s = time.perf_counter() - t0
        for b in batches[:n_batches]:
            predict_batch(model, protos, torch.from_numpy(b).to(dev), pcfg, cfg.data.image_size)
        return proto_s

    # --compare-partition-ops: the learned partition's CPU path and its batched torch ops, in one run
    variants = {"predict": cfg.predict}
    if learned and args.compare_partition_ops:
        variants = {f"predict_{ops}": replace(cfg.predict, partition_ops=ops) for ops in ("numpy", "torch")}
    rows = {}
    for name, pcfg in variants.items():
        with autocast(dev, dtype):
            for _ in range(args.warmup):
                run_all(1, pcfg)
            reset_memory(dev)
            sync(dev)
            t0 = time.perf_counter()
            proto_s = run_all(len(batches), pcfg)
            sync(dev)
            seconds = time.perf_counter() - t0
        n_support = len(voting[0]) if voting is not None else 0 if learned else len(support)
        extra = {"prototype_s": proto_s, "support_slices": n_support, "query_split": q_split,
                 "distinct_query_slices": len(queries), "batch_size": bs}
        if learned:
            extra["partition_ops"] = pcfg.partition_ops
        row = Timing(name, args.slices, seconds, 1, None, peak_memory_gb(dev), extra).summary(None, None, "slice")
        for k in ("ratio_to_seed", "flops_per_slice", "tflops", "fraction_of_bf16_peak"):
            row.pop(k)
        rows[name] = row
    return {
        "what": "fsct bench predict",
        **env,
        "settings": {"checkpoint": str(args.checkpoint) if args.checkpoint else "fresh (random weights)",
                     "shards": str(args.shards) if args.shards else "synthetic", "slices": args.slices,
                     "image_size": cfg.data.image_size, "out_size": 512, "feature_dim": cfg.model.feature_dim,
                     "variant": cfg.model.variant, "channels_last": cfg.model.channels_last,
                     "precision": args.mixed_precision, "tta_flip": cfg.predict.tta_flip,
                     "k_shot": cfg.predict.k_shot, "warmup": args.warmup,
                     "mode": cfg.predict.mode, "partition_split": cfg.predict.partition_split,
                     "support_vote": cfg.predict.support_vote},
        "results": rows,
    }


# --- command ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="train steps: fsct model-only, end to end from shards, the seed's")
    t.add_argument("--config", type=Path, help=f"YAML config (default {DEFAULT_CONFIG})")
    t.add_argument("--shards", type=Path, help="shard folder (default: a small synthetic set in a temp dir)")
    t.add_argument("--steps", type=int, default=50, help="timed optimizer steps per measurement")
    t.add_argument("--warmup", type=int, default=10, help="untimed steps before (compilation, autotuning)")
    t.add_argument("--seed-baseline", type=Path, metavar="PATH",
                   help="the seed notebook's model as a script (default: tests/fixtures/seed_baseline.py)")
    t.add_argument("--no-seed", action="store_true", help="skip the seed baseline")
    t.add_argument("--compare-compile", action="store_true",
                   help="time the model-only step both eager and with torch.compile")
    t.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step)")
    t.add_argument("--compare-loaders", action="store_true",
                   help="time end_to_end with data.loader=memory and with data.loader=stream")
    t.add_argument("--slices", type=int, default=0,
                   help="grow the train split to this many slices (tars of 64), repeating its slices")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    t.add_argument("--out", type=Path, default=Path("bench/train.json"), help="JSON to write")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p = sub.add_parser("predict", help="inference slices/s: prototypes + 512x512 argmax")
    p.add_argument("--checkpoint", type=Path, help="run dir with model.safetensors (default: fresh weights)")
    p.add_argument("--config", type=Path, help=f"config of the fresh model (default {DEFAULT_CONFIG})")
    p.add_argument("--shards", type=Path, help="shards with support + test splits (default: synthetic)")
    p.add_argument("--support-split", default="train")
    p.add_argument("--images-split", default="test", help="query split (train if the shards have no such)")
    p.add_argument("--slices", type=int, default=500, help="query slices to predict (cycled if fewer exist)")
    p.add_argument("--warmup", type=int, default=2, help="untimed prototype + one-batch passes before")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="autocast (`fsct predict` runs fp32 unless Accelerate is configured otherwise)")
    p.add_argument("--compare-partition-ops", action="store_true",
                   help="a dense model's learned partition: time predict.partition_ops numpy and torch")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench/predict.json"), help="JSON to write")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. predict.batch_size=32")


def run(args: argparse.Namespace) -> int:
    if args.what == "train":
        result = bench_train(args)
    else:
        result = bench_predict(args)
    s = result["settings"]
    title = f"fsct bench {args.what} on {result['device_name']} ({result['device']}), torch {result['torch']}"
    if args.what == "train":
        title += (f"\n{s['n_way']}-way {s['k_shot']}-shot {s['n_query']}-query, {s['image_size']}px, "
                  f"{s['episodes_per_step']} episodes/step, {s['precision']}")
    print_table(title, result["results"], TRAIN_COLUMNS if args.what == "train" else PREDICT_COLUMNS)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0

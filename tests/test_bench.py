"""`fsct bench train|predict` on the CPU at tiny settings: the JSON holds every measurement, with positive
rates that agree with each other, and the ratio to the seed baseline (tests/fixtures/seed_baseline.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fsct.bench import Timing, bf16_peak_tflops
from tests.conftest import REPO, SEED_BASELINE, fsct

TINY = ["data.image_size=64", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "episodes.episodes_per_step=2"]
SEED = SEED_BASELINE


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_cpu(tmp_path: Path):
    out = tmp_path / "train.json"
    seed_args = ["--seed-baseline", str(SEED)] if SEED.is_file() else ["--no-seed"]
    # no --shards: the command makes its own small synthetic shard set, its train split grown to 24 slices
    r = fsct("bench", "train", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out),
             "--compare-loaders", "--slices", "24", *seed_args, *TINY, "data.buffer_slices=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model_only" in r.stdout and "end_to_end (stream)" in r.stdout  # the table
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["peak_bf16_tflops"] is None and res["torch"]
    s = res["settings"]
    assert (s["image_size"], s["feature_dim"], s["n_way"], s["episodes_per_step"]) == (64, 32, 2, 2)
    assert s["shards"] == "synthetic" and s["precision"] == "fp32"
    rows = res["results"]
    e2e = ("end_to_end (memory)", "end_to_end (stream)")
    for name in ("model_only", *e2e):
        row = rows[name]
        assert row["timed"] == 2 * 2  # steps * episodes_per_step
        for key in ("episodes_per_s", "slices_per_s", "ms_per_episode", "flops_per_episode", "tflops"):
            assert positive(row[key]), (name, key, row[key])
        # an episode here is 2 ways x (1 support + 1 query) slices
        assert row["slices_per_s"] == pytest.approx(4 * row["episodes_per_s"])
        assert row["tflops"] == pytest.approx(row["flops_per_episode"] * row["episodes_per_s"] / 1e12)
        # CPU: no bf16 peak, no GPU memory
        assert row["fraction_of_bf16_peak"] is None and row["peak_mem_gb"] is None
    for name, loader in zip(e2e, ("memory", "stream"), strict=True):
        row = rows[name]
        assert row["loader"] == loader and row["pool_slices"] == 24
        assert 0 < row["loader_s"] < row["seconds"] and row["loader_share"] == pytest.approx(
            row["loader_s"] / row["seconds"])
    assert rows[e2e[1]]["ratio_to_memory"] == pytest.approx(
        rows[e2e[1]]["episodes_per_s"] / rows[e2e[0]]["episodes_per_s"])
    if not SEED.is_file():
        assert "seed" not in rows and rows["model_only"]["ratio_to_seed"] is None
        pytest.skip(f"{SEED} not found: seed ratio not checked")
    seed = rows["seed"]
    assert positive(seed["episodes_per_s"]) and seed["timed"] == 2
    assert seed["flops_per_episode"] > rows["model_only"]["flops_per_episode"]  # it recomputes layer2/3
    for name in ("model_only", *e2e):
        expected = rows[name]["episodes_per_s"] / seed["episodes_per_s"]
        assert rows[name]["ratio_to_seed"] == pytest.approx(expected)


def test_bench_predict_cpu(shards: Path, tmp_path: Path):
    out = tmp_path / "predict.json"
    r = fsct("bench", "predict", "--device", "cpu", "--shards", str(shards), "--slices", "10",
             "--warmup", "1", "--out", str(out), "data.image_size=64", "model.feature_dim=32",
             "predict.batch_size=4", "predict.k_shot=1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["settings"]["checkpoint"].startswith("fresh") and res["settings"]["out_size"] == 512
    row = res["results"]["predict"]
    assert row["timed"] == 10 and row["batch_size"] == 4
    assert row["query_split"] == "test" and row["distinct_query_slices"] == 4  # 10 slices cycle over the 4
    for key in ("slices_per_s", "ms_per_slice", "seconds", "prototype_s"):
        assert positive(row[key]), (key, row[key])
    assert row["slices_per_s"] == pytest.approx(10 / row["seconds"])
    assert row["prototype_s"] < row["seconds"]  # the prototypes are part of the timed work


def test_bench_predict_times_the_learned_partition_both_ways(shards: Path, tmp_path: Path):
    """A dense model predicting the learned partition, one row per partition_ops: the recipe's support vote
    makes its prototypes from the support split's labelled slices once (timed); without the vote there are
    none."""
    from fsct.vote import voter_keys

    tiny = ["data.image_size=64", "model.feature_dim=16", "model.decoder_dim=16", "predict.batch_size=4"]
    out = tmp_path / "predict.json"
    r = fsct("bench", "predict", "--device", "cpu", "--config", str(REPO / "configs" / "partition_cpu.yaml"),
             "--shards", str(shards), "--slices", "4", "--warmup", "0", "--compare-partition-ops", "--out", str(out),
             *tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["settings"]["partition_split"] == "learned"
    rows = res["results"]
    assert set(rows) == {"predict_numpy", "predict_torch"}
    voting = len(voter_keys(shards, "train", 32))
    for ops, row in (("numpy", rows["predict_numpy"]), ("torch", rows["predict_torch"])):
        assert row["partition_ops"] == ops and row["timed"] == 4 and 0 < row["prototype_s"] < row["seconds"]
        assert row["support_slices"] == voting > 2 and positive(row["slices_per_s"])
        assert row["slices_per_s"] == pytest.approx(4 / row["seconds"])
    r = fsct("bench", "predict", "--device", "cpu", "--config", str(REPO / "configs" / "partition_cpu.yaml"),
             "--shards", str(shards), "--slices", "4", "--warmup", "0", "--out", str(tmp_path / "off.json"), *tiny,
             "predict.support_vote=0")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "off.json").read_text())["results"]["predict"]
    assert row["prototype_s"] == 0 and row["support_slices"] == 0


def test_missing_seed_baseline_is_a_one_line_error(tmp_path: Path):
    missing = tmp_path / "nope.py"
    r = fsct("bench", "train", "--device", "cpu", "--seed-baseline", str(missing), "--out",
             str(tmp_path / "t.json"), *TINY)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"fsct bench: error: {missing}: seed baseline script not found"]
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_bf16_peaks(name: str, peak: float | None):
    assert bf16_peak_tflops(name) == peak


def test_timing_summary():
    t = Timing("x", items=10, seconds=2.0, slices_per_item=4, flops_per_item=1e12, peak_mem_gb=1.5)
    row = t.summary(peak_tflops=10.0, seed_per_s=2.5, unit="episode")
    assert row["episodes_per_s"] == 5.0 and row["slices_per_s"] == 20.0 and row["ms_per_episode"] == 200.0
    assert row["ratio_to_seed"] == 2.0 and row["tflops"] == 5.0 and row["fraction_of_bf16_peak"] == 0.5
    assert t.summary(None, None, "episode")["fraction_of_bf16_peak"] is None

"""Issue 15: nothing lost, nothing wrong. Each test reproduces one defect of the issue (numbered as there):
kills happen at exact points (FSCT_TEST_KILL), full disks by an injected ENOSPC (FSCT_TEST_ENOSPC)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fsct.checkpoint import load_model
from fsct.data.pool import load_split
from fsct.data.shards import verify
from fsct.errors import FsctError
from fsct.lock import locked
from fsct.predict import parts_dir
from fsct.runs import describe_run
from tests.conftest import REPO, fsct_env

TINY = ["data.image_size=64", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "train.val_every=0", "train.log_every=1", "optim.warmup_steps=2"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsct", *args], capture_output=True, text=True,
                          env=fsct_env() | (env or {}), timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *names: str) -> str:
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.shards={shards}",
            f"train.output_dir={out}", *TINY, *extra]


def predict_args(ckpt: Path, shards: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(ckpt), "--support", str(shards), "--images", str(images),
            "--out", str(out), "predict.batch_size=2", *extra]


def rewrite_tar(path: Path, keep: int | None = None, extra: int = 0) -> None:
    """Rewrite a tar with only its first `keep` members (a cut at a member boundary) or `extra` more."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    members = members[:keep] if keep is not None else members
    for i in range(extra):
        members.append((tarfile.TarInfo(f"extra{i}.meta.json"), b'{"classes": {}}'))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def ckpt(shards: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "run"
    r = run(*train_args(shards, out, "train.max_steps=2", "train.save_every=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# --- 1. predict parts from another checkpoint ------------------------------------------------------------

def other_checkpoint(ckpt: Path, dest: Path) -> Path:
    """The same architecture with other weights: what a second training run gives."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    shutil.copy(ckpt / "config.yaml", dest / "config.yaml")
    weights = {k: v + 0.5 if v.is_floating_point() else v for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(weights, str(dest / "model.safetensors"))
    return dest


def test_1_parts_of_another_checkpoint_are_redone(ckpt: Path, shards: Path, tmp_path: Path):
    b = other_checkpoint(ckpt, tmp_path / "b")
    ref_b = tmp_path / "ref_b.csv"
    assert run(*predict_args(b, shards, shards, ref_b)).returncode == 0
    out = tmp_path / "sub.csv"
    r = run(*predict_args(ckpt, shards, shards, out), env={"FSCT_TEST_KILL": "predict:part"})
    assert r.returncode == -9 and list(parts_dir(out).glob("part-*.npz"))  # killed after checkpoint A's part
    r = run(*predict_args(b, shards, shards, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already complete" not in r.stdout and "discarded" in r.stdout
    assert out.read_bytes() == ref_b.read_bytes()  # B's submission, not A's

    # the same checkpoint and settings still reuse the finished part
    out2 = tmp_path / "again.csv"
    assert run(*predict_args(b, shards, shards, out2), env={"FSCT_TEST_KILL": "predict:part"}).returncode == -9
    r = run(*predict_args(b, shards, shards, out2))
    assert r.returncode == 0 and "already complete, skipped" in r.stdout
    assert out2.read_bytes() == ref_b.read_bytes()

    # 4. an existing --out is refused without --overwrite, and left as it was
    before = out.read_bytes()
    one_line_error(run(*predict_args(ckpt, shards, shards, out)), str(out), "--overwrite")
    assert out.read_bytes() == before
    assert run(*predict_args(ckpt, shards, shards, out, "--overwrite")).returncode == 0
    assert out.read_bytes() != before


# --- 2. readers trust index.json, not the tars -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["cut-at-member", "extra-members", "same-size-flip", "missing"])
def test_2_readers_check_tars_against_index(shards: Path, tmp_path: Path, damage: str):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    victim = copy / index["splits"]["test"]["shards"][0]["name"]
    if damage == "cut-at-member":
        rewrite_tar(victim, keep=4)  # the first slice's members only: a valid, shorter tar
    elif damage == "extra-members":
        rewrite_tar(victim, extra=2)
    elif damage == "same-size-flip":
        data = bytearray(victim.read_bytes())
        data[2048] ^= 0xFF  # inside the first image's pixels: the tar still parses
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with pytest.raises(FsctError, match=victim.name):
        load_split(copy, "test")
    with pytest.raises(FsctError, match=victim.name):
        verify(copy)


def test_2_predict_and_train_stop_on_a_damaged_tar(ckpt: Path, shards: Path, tmp_path: Path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    test_tar = copy / index["splits"]["test"]["shards"][0]["name"]
    rewrite_tar(test_tar, keep=4)
    out = tmp_path / "sub.csv"
    one_line_error(run(*predict_args(ckpt, shards, copy, out)), test_tar.name)
    assert not out.exists()
    train_tar = copy / index["splits"]["train"]["shards"][0]["name"]
    train_tar.write_bytes(train_tar.read_bytes()[:5000])  # truncated mid-member
    one_line_error(run(*train_args(copy, tmp_path / "run", "train.max_steps=1")), train_tar.name)
    assert describe_run(tmp_path / "run") is None  # a failed start: the next plain `fsct train` may go ahead


# --- 3. a split merge is crash-safe ----------------------------------------------------------------------

@pytest.fixture
def fresh(synth: Path, tmp_path: Path) -> Path:
    """A shard folder with the test split only (4 slices: fast to write)."""
    out = tmp_path / "fresh"
    r = run("shard", "--images", str(synth / "X_test" / "images"), "--out", str(out), "--split", "test",
            "--shard-size", "2")
    assert r.returncode == 0, r.stderr
    return out


def merge_args(synth: Path, out: Path, *extra: str) -> list[str]:
    return ["shard", "--images", str(synth / "X_test" / "images"), "--out", str(out), "--split", "extra",
            "--shard-size", "2", *extra]


@pytest.mark.parametrize("point", ["shard:before-index", "shard:after-index"])
def test_3_merge_killed_at_any_point_leaves_a_consistent_folder(synth: Path, fresh: Path, point: str):
    r = run(*merge_args(synth, fresh), env={"FSCT_TEST_KILL": point})
    assert r.returncode == -9
    index = json.loads((fresh / "index.json").read_text())
    assert ("extra" in index["splits"]) == (point == "shard:after-index")
    for split in index["splits"]:  # what the index lists is whole and readable
        assert len(load_split(fresh, split)) == index["splits"][split]["n_samples"] == 4
    if point == "shard:before-index":  # new tars the index does not list: --verify says so
        with pytest.raises(FsctError, match="not listed"):
            verify(fresh)
    r = run(*merge_args(synth, fresh, "--overwrite"))  # the next run cleans up and commits
    assert r.returncode == 0, r.stderr
    assert verify(fresh) == {"test": 4, "extra": 4}
    assert not list(fresh.parent.glob(".fresh.*"))


def test_3_full_disk_at_the_index_write_changes_nothing(synth: Path, fresh: Path):
    before = {p.name: p.read_bytes() for p in fresh.iterdir()}
    r = run(*merge_args(synth, fresh), env={"FSCT_TEST_ENOSPC": "shard:before-index"})
    one_line_error(r, str(fresh), "No space left")
    assert {p.name: p.read_bytes() for p in fresh.iterdir()} == before
    assert verify(fresh) == {"test": 4}
    assert not list(fresh.parent.glob(".fresh.*"))


# --- 4. locks --------------------------------------------------------------------------------------------

def test_4_a_second_writer_is_refused_naming_the_holder(synth: Path, ckpt: Path, shards: Path, fresh: Path,
                                                         tmp_path: Path):
    before = (fresh / "index.json").read_bytes()
    with locked(fresh):  # this test process is "the first writer"
        one_line_error(run(*merge_args(synth, fresh)), str(fresh), f"pid {os.getpid()}")
        out = tmp_path / "run"
        with locked(out):
            one_line_error(run(*train_args(shards, out, "train.max_steps=1")), f"pid {os.getpid()}")
        assert not out.exists()
        sub = tmp_path / "sub.csv"
        with locked(sub):
            one_line_error(run(*predict_args(ckpt, shards, shards, sub)), f"pid {os.getpid()}")
        assert not sub.exists()
    assert (fresh / "index.json").read_bytes() == before
    assert run(*merge_args(synth, fresh)).returncode == 0  # released: the kernel drops it with its holder


# --- 4, 5, 6. train into a finished run, damaged checkpoints, records after resume ----------------------

def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_4_5_6_train_refuses_a_finished_run_and_resume_falls_back(shards: Path, tmp_path: Path):
    ref = tmp_path / "ref"
    assert run(*train_args(shards, ref, "train.max_steps=3", "train.save_every=0")).returncode == 0

    out = tmp_path / "run"
    steps = ["train.save_every=1", "train.keep_checkpoints=3"]
    assert run(*train_args(shards, out, "train.max_steps=2", *steps)).returncode == 0
    model = (out / "model.safetensors").read_bytes()
    # 4: a finished run is not silently replaced
    one_line_error(run(*train_args(shards, out, "train.max_steps=3", *steps)), str(out), "--resume",
                   "--overwrite")
    assert (out / "model.safetensors").read_bytes() == model and metric_steps(out) == [1, 2]

    # 5: the newest checkpoint is damaged: resume says so and falls back to the one before
    newest = out / "checkpoints" / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run(*train_args(shards, out, "train.max_steps=3", *steps), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped checkpoint {newest.parent}: model.safetensors" in r.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1" in r.stdout
    # 6: each step logged once, and the audit covers the whole run, as an uninterrupted one's does
    assert metric_steps(out) == [1, 2, 3]
    a, b = (json.loads((d / "rank0.json").read_text()) for d in (out, ref))
    assert a["episodes_digest"] == b["episodes_digest"] and a["state"] == b["state"]
    assert (a["device"], a["torch_threads"]) == ("cpu", 1)  # fsct_env's OMP_NUM_THREADS=1
    assert not list((out / "checkpoints").glob(".*"))

    # 5: no loadable checkpoint at all, and an explicit damaged one: one line each, naming it
    for p in (out / "checkpoints").glob("step_*/model.safetensors"):
        p.write_bytes(b"")
    one_line_error(run(*train_args(shards, out, "train.max_steps=4", *steps), "--resume", "auto"),
                   "no loadable checkpoint")
    ckpt = out / "checkpoints" / "step_00000003"
    one_line_error(run(*train_args(shards, out, "train.max_steps=4"), "--resume", str(ckpt)), str(ckpt))

    # --overwrite replaces the run
    r = run(*train_args(shards, out, "train.max_steps=1", "train.save_every=0"), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert metric_steps(out) == [1] and [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_5_damaged_model_file_is_one_line(ckpt: Path, shards: Path, tmp_path: Path, damage: str):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad, ignore=shutil.ignore_patterns("checkpoints"))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000] if damage == "truncated" else b"")
    with pytest.raises(FsctError, match="model.safetensors"):
        load_model(bad)
    if damage == "truncated":
        out = tmp_path / "sub.csv"
        one_line_error(run(*predict_args(bad, shards, shards, out)), str(weights))
        assert not out.exists()


# --- 7. leftovers ----------------------------------------------------------------------------------------

def fsct_processes(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_7_killed_shard_leaves_no_workers_and_its_temporaries_are_removed(synth: Path, tmp_path: Path):
    out = tmp_path / "killed"
    args = ["shard", "--images", str(synth / "X_train" / "images"), "--labels", str(synth / "Y_train.csv"),
            "--out", str(out), "--workers", "2"]
    r = run(*args, env={"FSCT_TEST_KILL": "shard:sample"})
    assert r.returncode == -9
    assert list(tmp_path.glob(".killed.tmp-*"))  # what a killed writer leaves
    # the kernel kills the workers with their parent (PR_SET_PDEATHSIG); wait for them to be reaped
    import time
    for _ in range(200):
        if not fsct_processes(str(out)):
            break
        time.sleep(0.05)
    assert not fsct_processes(str(out))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".killed.*")) and verify(out)["train"] > 0


def test_7_killed_predict_csv_temporary_is_removed(ckpt: Path, shards: Path, tmp_path: Path):
    out = tmp_path / "sub.csv"
    stale = tmp_path / ".sub.csv.tmp-dead"
    stale.write_bytes(b"x" * 1000)  # what a predict killed during the CSV write leaves
    assert run(*predict_args(ckpt, shards, shards, out)).returncode == 0
    assert not stale.exists() and not parts_dir(out).exists()


def test_7_full_disk_in_predict_is_one_line(ckpt: Path, shards: Path, tmp_path: Path):
    out = tmp_path / "sub.csv"
    r = run(*predict_args(ckpt, shards, shards, out), env={"FSCT_TEST_ENOSPC": "predict:write-part"})
    one_line_error(r, "No space left")
    assert not out.exists() and not list(parts_dir(out).glob("*.npz")) and not list(tmp_path.glob(".sub.csv.tmp*"))
    assert not list(parts_dir(out).glob(".*tmp*"))


# --- 9. score pairs by position --------------------------------------------------------------------------

def test_9_score_refuses_columns_swapped_by_name(tmp_path: Path):
    from fsct.data.challenge import write_labels

    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (2, 512, 512)).astype(np.uint8)
    truth, pred = tmp_path / "truth.csv", tmp_path / "pred.csv"
    write_labels(truth, masks, ["0.png", "1.png"], index_prefix="Pixel ")
    write_labels(pred, masks[[1, 0]], ["1.png", "0.png"], index_prefix="")
    one_line_error(run("score", "--pred", str(pred), "--truth", str(truth)), str(pred), "position")


@pytest.mark.slow
def test_1_two_ranks_never_mix_parts_of_two_checkpoints(ckpt: Path, shards: Path, tmp_path: Path):
    b = other_checkpoint(ckpt, tmp_path / "b")
    ref_b = tmp_path / "ref_b.csv"  # batch size 1: a slice's labels do not depend on its rank's batches
    assert run(*predict_args(b, shards, shards, ref_b, "predict.batch_size=1")).returncode == 0

    def launch(checkpoint: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(31500 + os.getpid() % 1000), "-m", "fsct",
               *predict_args(checkpoint, shards, shards, out, "predict.batch_size=1")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=fsct_env() | {"ACCELERATE_USE_CPU": "1"} | env)

    out = tmp_path / "sub.csv"
    r = launch(ckpt, out, {"FSCT_TEST_KILL": "predict:part"})  # each rank dies once its part of A is written
    assert r.returncode != 0 and list(parts_dir(out).glob("part-*-of-00002.npz"))
    r = launch(b, out, {})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already complete" not in r.stdout
    assert out.read_bytes() == ref_b.read_bytes()  # all of it B's

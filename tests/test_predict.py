"""`fsct predict`: the submission is exactly the predicted masks, 1 and 2 processes agree, parts are reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fsct.checkpoint import load_model
from fsct.data.pool import load_split
from fsct.predict import fingerprint, part_path, predict_batch, support_prototypes
from fsct.submission import read_submission
from tests.conftest import REPO, fsct, fsct_env

TINY = ["data.image_size=64", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "train.val_every=0", "train.max_steps=3", "train.save_every=0"]


@pytest.fixture(scope="module")
def checkpoint(shards: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    r = fsct("train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.shards={shards}",
             f"train.output_dir={out}", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def predict_args(checkpoint: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), "--support", str(shards), "--images", str(shards),
            "--out", str(out), "predict.batch_size=3", *extra]


def test_submission_is_exactly_the_prediction(checkpoint: Path, shards: Path, tmp_path: Path):
    out = tmp_path / "sub.csv"
    r = fsct(*predict_args(checkpoint, shards, out))
    assert r.returncode == 0, r.stderr[-3000:]
    columns, masks = read_submission(out)
    test = load_split(shards, "test")
    assert columns == [str(i) for i in range(4)] and masks.shape == (4, 512, 512)

    model, cfg = load_model(checkpoint, ["predict.batch_size=3"])
    protos = support_prototypes(model, load_split(shards, "train", size=cfg.data.image_size), cfg.predict,
                                torch.device("cpu"))
    order = np.argsort([int(k) for k in test.keys])
    images = torch.from_numpy(test.images[order])
    # the same batches as the command ran (3 + 1): conv numerics may depend on the batch's size
    expected = np.concatenate([predict_batch(model, protos, images[i:i + 3], cfg.predict, cfg.data.image_size)[0]
                               for i in (0, 3)])
    np.testing.assert_array_equal(masks, expected)
    assert set(np.unique(masks)) <= {0, *protos.class_ids.tolist()}
    assert len(np.unique(masks)) > 1  # it predicted structures, not just background



def test_submission_validates(checkpoint: Path, shards: Path, synth: Path, tmp_path: Path):
    out = tmp_path / "sub.csv"
    assert fsct(*predict_args(checkpoint, shards, out)).returncode == 0
    r = fsct("validate-submission", str(out), "--images", str(synth / "X_test" / "images"))
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_two_processes_write_the_same_submission(checkpoint: Path, shards: Path, tmp_path: Path):
    # batch size 1: each slice then goes through the same kernels whichever rank predicts it
    one = tmp_path / "one.csv"
    assert fsct(*predict_args(checkpoint, shards, one, "predict.batch_size=1")).returncode == 0
    two = tmp_path / "two.csv"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(30500 + os.getpid() % 1000), "-m", "fsct",
           *predict_args(checkpoint, shards, two, "predict.batch_size=1")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=fsct_env() | {"ACCELERATE_USE_CPU": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()
    assert not part_path(two, 0, 2).parent.exists()  # parts are cleaned up after the merge


def test_rerun_reuses_finished_parts_and_redoes_corrupt_ones(checkpoint: Path, shards: Path, tmp_path: Path):
    out = tmp_path / "sub.csv"
    keys = load_split(shards, "test").keys
    part = part_path(out, 0, 1)
    part.parent.mkdir(parents=True)
    planted = np.full((len(keys), 512, 512), 7, np.uint8)  # what a crashed earlier run left behind
    # made by this checkpoint and these settings: parts carry that fingerprint (issue 15)
    _, cfg = load_model(checkpoint, ["predict.batch_size=3"])
    fp = fingerprint(checkpoint / "model.safetensors", cfg, shards, "train", shards, "test", 1)
    (part.parent / "FINGERPRINT").write_text(fp + "\n")
    with open(part, "wb") as f:
        np.savez(f, keys=np.array(keys, dtype=str), masks=planted, fingerprint=np.array(fp))
    r = fsct(*predict_args(checkpoint, shards, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already complete, skipped" in r.stdout
    _, masks = read_submission(out)
    assert (masks == 7).all()

    part.parent.mkdir(parents=True)
    part.write_bytes(b"half a file")
    r = fsct(*predict_args(checkpoint, shards, out, "--overwrite"))
    assert r.returncode == 0 and "skipped" not in r.stdout
    _, masks = read_submission(out)
    assert not (masks == 7).all()

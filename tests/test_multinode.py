"""Two machine ranks for real, on one machine: two `accelerate launch` processes with the arguments
launch/slurm/common.sh builds for a 2-node job (multinode.yaml, c10d rendezvous at 127.0.0.1), one process
each, CPU/gloo. Training streams episodes from 3 train tars (not a multiple of the 2 ranks: the ranks still
step together); prediction merges the parts of both machine ranks into the 1-process submission."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, fsct, fsct_env

TINY = ["data.image_size=32", "model.feature_dim=32", "episodes.n_way=2", "episodes.k_shot=1",
        "episodes.n_query=1", "train.log_every=1", "train.val_every=0", "optim.warmup_steps=2",
        "train.max_steps=3", "train.save_every=0", "data.loader=stream", "data.buffer_slices=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_launch_args(tmp: Path, nnodes: int, port: int) -> list[str]:
    """`launch_args` as launch/slurm/common.sh builds them for a CPU job of `nnodes` nodes, one process each,
    its first node resolving to 127.0.0.1 (a stand-in `scontrol`)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FSCT_ROOT=str(REPO), ENV_SETUP=":",
               SLURM_NNODES=str(nnodes), SLURM_JOB_NODELIST="localhost", FSCT_CPU="1", CPU_PROCS_PER_NODE="1",
               GPUS_PER_NODE="1", ACCELERATE_CONFIG="", MAIN_PORT=str(port))
    env.pop("SLURM_CPUS_PER_TASK", None)
    script = 'set -euo pipefail; source "$FSCT_ROOT/launch/slurm/common.sh"; printf "%s\\n" "${launch_args[@]}"'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_two_machines(tmp: Path, name: str, *fsct_args: str, timeout: float = 300) -> list[str]:
    """Machine ranks 0 and 1, each `accelerate launch --machine_rank R <launch_args> -m fsct ...` as
    train.sbatch starts it on each node; both must exit 0. Returns their logs."""
    port = free_port()
    args = slurm_launch_args(tmp, 2, port)
    env = fsct_env() | {"ACCELERATE_USE_CPU": "1"}
    logs = [tmp / f"{name}-machine{r}.log" for r in (0, 1)]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    try:
        for r, log in enumerate(logs):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--machine_rank", str(r), *args, "-m",
                   "fsct", *fsct_args]
            with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall a rank and so both
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                              start_new_session=True))
            # Machine rank 0 hosts the rendezvous store, as on a cluster: on one host a rank 1 started first
            # would take the port itself and rank 0's launcher would refuse it as busy.
            while r == 0 and not listening(port) and procs[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        # one failed machine leaves the other waiting at a collective: stop both soon after
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 20)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [log.read_text() for log in logs]
    for r, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"machine rank {r} exited {p.returncode}:\n{text[-3000:]}"
    return texts


@pytest.fixture(scope="module")
def two_machine_run(stream_shards: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("multinode")
    out = tmp / "run"
    logs = run_two_machines(tmp, "train", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                            f"data.shards={stream_shards}", f"train.output_dir={out}", *TINY)
    return out, logs


def test_slurm_scripts_launch_two_nodes_with_the_test_rendezvous(tmp_path: Path):
    args = slurm_launch_args(tmp_path, 2, 29999)
    assert args == ["--config_file", "launch/accelerate/multinode.yaml", "--num_machines", "2",
                    "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "29999",
                    "--rdzv_backend", "c10d", "--mixed_precision", "no"]
    assert "rdzv_backend: c10d" in (REPO / "launch" / "accelerate" / "multinode.yaml").read_text()
    sbatch = (REPO / "launch" / "slurm" / "train.sbatch").read_text()
    assert 'accelerate launch --machine_rank "$SLURM_NODEID" "$@"' in sbatch and '"${launch_args[@]}"' in sbatch


@pytest.mark.slow
def test_two_machine_ranks_train_together(two_machine_run: tuple[Path, list[str]], stream_shards: Path):
    out, logs = two_machine_run
    a, b = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["params"] == b["params"]  # the same weights: every step was all-reduced across the machines
    assert a["step"] == b["step"] == 3 and a["episodes"] == b["episodes"] == 3
    assert a["loader"] == b["loader"] == "stream"
    assert not set(a["shards"]) & set(b["shards"]) and not set(a["pool_keys"]) & set(b["pool_keys"])
    train = json.loads((stream_shards / "index.json").read_text())["splits"]["train"]
    assert sorted(a["shards"] + b["shards"]) == sorted(s["name"] for s in train["shards"])
    assert len(a["shards"]) != len(b["shards"])  # 3 tars over 2 ranks, and still no hang
    assert a["episodes_digest"] != b["episodes_digest"]
    # c10d numbers the ranks in the order the machines join, so either machine may hold global rank 0
    assert sum("step 3/3" in log for log in logs) == 1
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_machine_ranks_predict_the_one_process_submission(two_machine_run: tuple[Path, list[str]],
                                                             stream_shards: Path, tmp_path: Path):
    model = two_machine_run[0]
    args = ["predict", "--checkpoint", str(model), "--support", str(stream_shards), "--images",
            str(stream_shards), "predict.batch_size=1"]  # batch 1: each slice through the same kernels
    one = tmp_path / "one.csv"
    r = fsct(*args, "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two.csv"
    logs = run_two_machines(tmp_path, "predict", *args, "--out", str(two))
    assert one.read_bytes() == two.read_bytes()
    assert sum(f"{two}: 4 slices" in log for log in logs) == 1  # global rank 0 merged both machines' parts
    assert sum("predict rank 1: 2/2" in log for log in logs) == 1  # the other machine predicted its own half
    assert not (tmp_path / ".two.csv.parts").exists()

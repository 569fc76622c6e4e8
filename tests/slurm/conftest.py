"""A real one-node SLURM cluster on localhost for the batch-script tests (launch/slurm/local/start.sh).

Needs root and the slurm-wlm + munge packages (.ci/run installs them); without them these tests skip.
The cluster gets its own directory and free ports, so it never meets another one on the same machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, fsct

LOCAL = REPO / "launch" / "slurm" / "local"
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge")


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]  # what sbatch/scontrol and the jobs need: SLURM_CONF, ENV_SETUP, offline W&B

    def run(self, *cmd: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=timeout)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}); apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd, munged)")
    bindir = Path(sys.executable).parent
    if not (bindir / "accelerate").exists():
        pytest.skip(f"no accelerate script beside {sys.executable}")

    state = tmp_path_factory.mktemp("slurm")
    ctld_port, slurmd_port = _free_ports(2)
    env = dict(os.environ)
    env.update(FSCT_SLURMCTLD_PORT=str(ctld_port), FSCT_SLURMD_PORT=str(slurmd_port))
    r = subprocess.run(
        ["bash", str(LOCAL / "start.sh"), str(state)], capture_output=True, text=True, env=env, timeout=120
    )
    if r.returncode != 0:
        subprocess.run(["bash", str(LOCAL / "stop.sh"), str(state)], env=env, timeout=120)
        pytest.fail(f"start.sh failed:\n{r.stdout}\n{r.stderr}")
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"export SLURM_CONF={state / 'slurm.conf'}", r.stdout

    # The jobs run the interpreter running the tests (its venv's accelerate and python), one thread each.
    env.update(
        SLURM_CONF=str(state / "slurm.conf"),
        ENV_SETUP=f'export PATH="{bindir}:$PATH"',
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    yield Cluster(state, env)
    subprocess.run(["bash", str(LOCAL / "stop.sh"), str(state)], env=env, timeout=120)


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic challenge data and its shards: (data dir, shard dir)."""
    root = tmp_path_factory.mktemp("slurm-data")
    data, shards = root / "data", root / "shards"
    r = fsct("synth", "--out", str(data), "--preset", "demo", "--n-train", "40", "--n-test", "6", "--workers", "1")
    assert r.returncode == 0, r.stderr
    r = fsct(
        "shard",
        "--images",
        str(data / "X_train"),
        "--labels",
        str(data / "Y_train.csv"),
        "--out",
        str(shards),
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    return data, shards

"""The batch scripts on a real (local, one-node) SLURM cluster, in CPU mode: 2 processes over gloo.

train.sbatch end to end, the preemption round trip (USR1 -> checkpoint -> requeue -> resume -> finish),
and pipeline.sh's shard -> train -> predict chain.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
PIPELINE = REPO / "launch" / "slurm" / "pipeline.sh"
# The local node has 2 cores and no GPUs; tiny images and episodes keep a step well under a second.
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]
TINY = [
    "data.image_size=64",
    "episodes.n_way=2",
    "episodes.k_shot=1",
    "episodes.n_query=1",
    "train.val_every=0",
    "train.log_every=1",
]


def _submit(cluster, out: Path, log_dir: Path, shards: Path, *overrides: str, wait: bool) -> tuple[str, str]:
    env = cluster.env | {"FSCT_CPU": "1", "OUTPUT_DIR": str(out), "FSCT_ROOT": str(REPO)}
    cmd = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        *CPU_SBATCH,
        f"--output={log_dir}/%x-%j.out",
        str(TRAIN),
        f"data.shards={shards}",
        *TINY,
        *overrides,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=log_dir, timeout=300)
    job = r.stdout.strip().splitlines()[0].split(";")[0] if r.stdout.strip() else ""
    assert r.returncode == 0, f"sbatch failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{_log(log_dir, job)}"
    return job, r.stdout


def _log(log_dir: Path, job: str) -> str:
    path = log_dir / f"fsct-train-{job}.out"
    return path.read_text() if path.is_file() else f"(no log {path})"


def _job_field(cluster, job: str, field: str) -> str | None:
    r = cluster.run("scontrol", "show", "job", job)
    m = re.search(rf"\b{field}=(\S+)", r.stdout)
    return m.group(1) if m else None


def _step_numbers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/\d+ ", text, flags=re.M)]


def test_train_sbatch_two_cpu_processes(slurm_cluster, slurm_data, tmp_path):
    _, shards = slurm_data
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    job, _ = _submit(slurm_cluster, out, logs, shards, "train.max_steps=6", "train.save_every=3", wait=True)

    log = _log(logs, job)
    assert f"job {job} run 1 on localhost: 1 node(s) x 2 process(es)" in log, log
    assert _step_numbers(log) == [1, 2, 3, 4, 5, 6], log
    assert "done: 6 steps" in log and "fsct-train: finished" in log, log
    for step in (3, 6):
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
        # one RNG state per process: the job really ran two ranks
        assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]
    assert json.loads((out / "DONE").read_text())["step"] == 6
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"], ranks  # DDP kept the two replicas identical
    assert not (out / "PREEMPT").exists() and not (out / "PREEMPTED").exists()


def test_preempt_requeue_resume(slurm_cluster, slurm_data, tmp_path):
    _, shards = slurm_data
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    max_steps = 30
    job, _ = _submit(
        slurm_cluster, out, logs, shards, f"train.max_steps={max_steps}", "train.save_every=1000", wait=False
    )
    log_path = logs / f"fsct-train-{job}.out"

    deadline = time.monotonic() + 150
    while not (log_path.is_file() and len(_step_numbers(log_path.read_text())) >= 2):
        assert _job_field(slurm_cluster, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _log(logs, job)
        assert time.monotonic() < deadline, f"no training steps in time:\n{_log(logs, job)}"
        time.sleep(0.5)
    r = slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert r.returncode == 0, r.stderr

    # The same job id runs again; it stays visible until MinJobAge (4 s) after it completes.
    restarts, state = None, None
    deadline = time.monotonic() + 200
    while state != "COMPLETED":
        state = _job_field(slurm_cluster, job, "JobState")
        if state is None and "fsct-train: finished" in _log(logs, job):
            break  # completed and already purged (MinJobAge) between two polls
        restarts = _job_field(slurm_cluster, job, "Restarts") or restarts
        assert state in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING", "COMPLETED"), (
            f"job {job} is {state}:\n{_log(logs, job)}"
        )
        assert time.monotonic() < deadline, f"job {job} still {state}:\n{_log(logs, job)}"
        time.sleep(1)
    assert restarts is not None and int(restarts) >= 1, restarts

    log = _log(logs, job)
    saved = re.search(r"^preempted: checkpoint saved at step (\d+)$", log, flags=re.M)
    assert saved, log
    n = int(saved.group(1))
    assert 0 < n < max_steps
    assert "fsct-train: USR1 received" in log and f"fsct-train: preempted at step {n}; requeueing" in log, log
    assert f"job {job} run 2 on localhost" in log, log
    resumed = re.search(r"^resumed from (\S+) at step (\d+)$", log, flags=re.M)
    assert resumed, log
    assert Path(resumed.group(1)) == out / "checkpoints" / f"step_{n:08d}"
    assert int(resumed.group(2)) == n
    # Before the requeue: 1..n; after it the counter goes on from n+1 instead of starting over.
    first, second = _step_numbers(log[: resumed.start()]), _step_numbers(log[resumed.end() :])
    assert first == list(range(1, n + 1)), log
    assert second == list(range(n + 1, max_steps + 1)), log
    assert json.loads((out / "DONE").read_text())["step"] == max_steps
    assert not (out / "PREEMPTED").exists() and not (out / "PREEMPT").exists()
    assert (out / "checkpoints" / f"step_{max_steps:08d}" / "model.safetensors").is_file()


def test_pipeline_shard_train_predict(slurm_cluster, slurm_data, tmp_path):
    data, _ = slurm_data
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = slurm_cluster.env | {
        "FSCT_CPU": "1",
        "SBATCH_ARGS": " ".join(CPU_SBATCH),
        "LOG_DIR": str(logs),
        "OUTPUT_DIR": str(out),
        "SHARDS": str(tmp_path / "shards"),
        "SUBMISSION": str(tmp_path / "submission.csv"),
    }
    r = subprocess.run(
        ["bash", str(PIPELINE), str(data), "train.max_steps=4", *TINY],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = [m.group(1) for m in re.finditer(r"^\w+ +job (\d+) ->", r.stdout, flags=re.M)]
    assert len(jobs) == 3, r.stdout
    dependency = _job_field(slurm_cluster, jobs[2], "Dependency")
    assert dependency is not None and f"afterok:{jobs[1]}" in dependency, dependency

    def all_logs() -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*.out")))

    deadline = time.monotonic() + 200
    while slurm_cluster.run("squeue", "-h", "-j", ",".join(jobs), "-o", "%i").stdout.strip():
        assert time.monotonic() < deadline, f"pipeline still running:\n{all_logs()}"
        time.sleep(1)
    assert (out / "DONE").is_file(), all_logs()
    assert "fsct-predict: wrote" in (logs / f"fsct-predict-{jobs[2]}.out").read_text(), all_logs()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsct",
            "validate-submission",
            str(tmp_path / "submission.csv"),
            "--images",
            str(data / "X_test"),
        ],
        capture_output=True,
        text=True,
        env=slurm_cluster.env,
        timeout=120,
    )
    assert r.returncode == 0 and "ok (6 slices)" in r.stdout, r.stdout + r.stderr

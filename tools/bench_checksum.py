"""What the sha256 check of `load_split` costs: hashing one tar vs reading the whole split (median of 5).

    python tools/bench_checksum.py SHARD_DIR   (a folder with one `train` split, e.g. from `fsct shard`)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fsct.data.pool import file_sha256, load_split


def median_s(fn: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    folder = Path(sys.argv[1])
    tars = sorted(folder.glob("*.tar"))
    mib = sum(t.stat().st_size for t in tars) / 2**20
    hashed = median_s(lambda: [file_sha256(t) for t in tars])
    full = median_s(lambda: load_split(folder, "train"))
    print(f"{len(tars)} tar(s), {mib:.1f} MiB: sha256 {hashed * 1e3:.0f} ms ({mib / hashed:.0f} MiB/s); "
          f"load_split (hash included) {full * 1e3:.0f} ms, of which the hash is {100 * hashed / full:.0f}%")


if __name__ == "__main__":
    main()

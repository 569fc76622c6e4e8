"""The support vote's softmax sharpness experiment (docs/RESULTS.md, "The vote's sharpness and the learning
rate"): `tools/threshold_sweep.py` with the vote's scale (the model's cosine scale, fsct/vote.py) multiplied
by --mult, to ask whether a softer or sharper vote than the one the prototype loss trained merges better.

  python docs/experiments/vote_scale.py --mult 0.5 --model M --shards SHARDS --data DIR   # threshold_sweep's args

An experiment, not an option: the model's own scale was the best or level on every data set measured.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import fsct.vote


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mult", type=float, required=True, help="the vote's scale = the model's scale x this")
    a, rest = p.parse_known_args()
    pad = fsct.vote.pad_voters

    def scaled(protos, scale: float, weight: float) -> fsct.vote.Voters:
        return pad(protos, scale * a.mult, weight)

    fsct.vote.pad_voters = scaled  # support_voters looks it up in the module when it is called
    tool = Path(__file__).resolve().parents[2] / "tools" / "threshold_sweep.py"
    sys.argv = [str(tool), *rest]
    runpy.run_path(str(tool), run_name="__main__")


if __name__ == "__main__":
    main()

"""`fsct <command> ...`: each command lives in its own module with `add_arguments(parser)` and
`run(args) -> int | None`; only the chosen module is imported, so `fsct score` never pays for torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from fsct.errors import FsctError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("fsct.data.synth", "write deterministic synthetic CT in the challenge layout"),
    "shard": ("fsct.data.shards", "challenge data -> WebDataset shards + index.json (or --verify)"),
    "train": ("fsct.train", "train PANet (alone or under accelerate launch)"),
    "predict": ("fsct.predict", "sharded inference -> submission CSV"),
    "score": ("fsct.score", "the official metric (and more) of a submission against the truth"),
    "validate-submission": ("fsct.submission", "check a submission file's shape, index, columns, values"),
    "bench": ("fsct.bench", "speed benchmarks (train, predict)"),
    "config": ("fsct.config_cmd", "`config show CONFIG [key=value ...]`: print the resolved settings"),
}


def _usage() -> str:
    lines = ["usage: fsct [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<21}{desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`fsct <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"fsct {version('fsct')}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fsct: error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fsct {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.run(args)
    except FsctError as e:
        print(f"fsct {name}: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)

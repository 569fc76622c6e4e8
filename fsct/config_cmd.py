"""`fsct config show CONFIG [key=value ...]`: print the resolved settings tree (defaults, then the YAML file,
then the overrides), checked as a run would check them, so a typo shows before any run starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fsct.config import load_config, to_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config")
    show.add_argument("config", type=Path, nargs="?", help="YAML file (configs/*.yaml); none: the defaults")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100")


def resolved_yaml(config: Path | None, overrides: list[str]) -> str:
    return yaml.safe_dump(to_dict(load_config(config, overrides)), sort_keys=False)


def run(args: argparse.Namespace) -> int:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in str(config):  # `fsct config show key=value`: defaults plus overrides
        config, overrides = None, [str(config), *overrides]
    print(resolved_yaml(config, overrides), end="")
    return 0

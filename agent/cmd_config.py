"""``gpu-agent config check|show``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from gpuagent.configload import masked_dump

from .config import SECRET_KEYS, load_agent_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cfg = sub.add_parser("config", help="check or show a config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = cfg_sub.add_parser("check", help="validate FILE: prints OK or every problem (exit 2)")
    check.add_argument("file", type=Path)
    check.set_defaults(handler=_check)
    show = cfg_sub.add_parser(
        "show", help="print the effective config (defaults and env applied, secrets masked)"
    )
    show.add_argument("file", type=Path, nargs="?")
    show.set_defaults(handler=_show)


def _check(args: argparse.Namespace) -> int:
    load_agent_config(args.file)
    print(f"{args.file}: OK")  # noqa: T201
    return 0


def _show(args: argparse.Namespace) -> int:
    path = args.file if args.file is not None else args.config
    config = load_agent_config(Path(path) if path is not None else None)
    yaml.safe_dump(masked_dump(config, SECRET_KEYS), sys.stdout, sort_keys=False)
    return 0

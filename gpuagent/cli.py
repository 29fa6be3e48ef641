"""The one command-line skeleton ``gpu-agent`` and ``gpu-scheduler`` share.

Each program names its subcommand modules (each exposing ``register(subparsers)``)
and its config file; this module builds the parser and maps errors to exit codes:
0 success, 1 failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import yaml
from pydantic import BaseModel

from gpuagent import __version__
from gpuagent.configload import ConfigError, masked_dump

Handler = Callable[[argparse.Namespace], int]
ConfigT = TypeVar("ConfigT")


class UsageError(Exception):
    """Bad arguments or environment the user must fix; exit code 2."""


@dataclass(frozen=True)
class Program(Generic[ConfigT]):
    """One program: its name, its config file and loader, its subcommand modules."""

    prog: str
    description: str
    default_config: Path
    load: Callable[[Path | None], ConfigT]
    command_modules: Sequence[str]  # in --help order

    def config_path(self, args: argparse.Namespace) -> Path | None:
        """The --config file; the default path only if it exists, else built-in defaults."""
        if args.config is not None:
            return Path(args.config)
        return self.default_config if self.default_config.exists() else None

    def load_config(self, args: argparse.Namespace) -> ConfigT:
        return self.load(self.config_path(args))

    def build_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        parser.add_argument("--version", action="version", version=f"{self.prog} {__version__}")
        parser.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help=f"config file (default: {self.default_config} if it exists, "
            "else built-in defaults)",
        )
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for name in self.command_modules:
            importlib.import_module(name).register(sub)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        return run(self.build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen handler, mapping errors to exit codes."""
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {exc.source}: {problem}", file=sys.stderr)  # noqa: T201
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115, PTH123 - must outlive this frame
        return 0


def register_config_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    load: Callable[[Path | None], BaseModel],
    secret_keys: frozenset[str],
    show_help: str,
) -> None:
    """``config check FILE`` and ``config show [FILE]`` over the program's loader."""

    def check(args: argparse.Namespace) -> int:
        load(args.file)
        print(f"{args.file}: OK")  # noqa: T201
        return 0

    def show(args: argparse.Namespace) -> int:
        path = args.file if args.file is not None else args.config
        config = load(Path(path) if path is not None else None)
        yaml.safe_dump(masked_dump(config, secret_keys), sys.stdout, sort_keys=False)
        return 0

    cfg = sub.add_parser("config", help="check or show a config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check_parser = cfg_sub.add_parser(
        "check", help="validate FILE: prints OK or every problem (exit 2)"
    )
    check_parser.add_argument("file", type=Path)
    check_parser.set_defaults(handler=check)
    show_parser = cfg_sub.add_parser("show", help=show_help)
    show_parser.add_argument("file", type=Path, nargs="?")
    show_parser.set_defaults(handler=show)

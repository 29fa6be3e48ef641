"""``gpu-scheduler config check|show``."""

from __future__ import annotations

import argparse

from gpuagent.cli import register_config_commands

from .config import SECRET_KEYS, load_scheduler_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_config_commands(
        sub, load_scheduler_config, SECRET_KEYS, "print the effective config (secrets masked)"
    )

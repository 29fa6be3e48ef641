"""The NVIDIA Container Toolkit rule: which versions and settings may run GPU leases.

One home for it: ``doctor`` reports it, and the lease manager refuses GPU leases
while it says no (``ToolkitGate``).

- 1.17.8 fixes CVE-2025-23266 ("NVIDIAScape": a container's ``LD_PRELOAD`` reaches
  the createContainer hook, root on the host) and CVE-2025-23267 (ldconfig symlink
  following); 1.17.4 fixed CVE-2025-23359 (a TOCTOU escape, the bypass of the 1.16.2
  fix for CVE-2024-0132).
- Between 1.17.4 and 1.17.8, NVIDIA's documented workaround for CVE-2025-23266 is
  ``features.disable-cuda-compat-lib-hook = true`` in the toolkit's config.toml; a
  host with it set may serve GPU leases (with a warning). Below 1.17.4 nothing helps.
- ``features.allow-ldconfig-from-container`` and
  ``features.allow-cuda-compat-libs-from-container`` re-open what those fixes closed
  (the container's ldconfig, the container's compat libraries on the host's hook
  path): on, they are a problem whatever the version.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hostinfo import parse_version, toolkit_version

log = logging.getLogger(__name__)

MIN_TOOLKIT = (1, 17, 8)
MIN_WITH_WORKAROUND = (1, 17, 4)
TOOLKIT_CONFIG = Path("/etc/nvidia-container-runtime/config.toml")
WORKAROUND = "disable-cuda-compat-lib-hook"
RISKY_FEATURES = ("allow-ldconfig-from-container", "allow-cuda-compat-libs-from-container")
UPGRADE = (
    "upgrade nvidia-container-toolkit to 1.17.8 or newer "
    "(`apt-get install --only-upgrade nvidia-container-toolkit`, then `systemctl restart docker`)"
)


@dataclass(frozen=True)
class ToolkitVerdict:
    gpu_leases: bool  # may this host run GPU leases?
    problem: str  # "" when nothing is wrong
    fix: str = ""
    warning: str = ""  # allowed, but worth saying (workaround in use)


def read_features(path: Path = TOOLKIT_CONFIG) -> dict[str, Any]:
    """The ``[features]`` table of the toolkit's config.toml; empty when absent."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    features = data.get("features")
    return features if isinstance(features, dict) else {}


def judge(version: str | None, features: dict[str, Any]) -> ToolkitVerdict:
    """The verdict for an installed toolkit (``version`` None: not installed)."""
    if version is None:
        return ToolkitVerdict(
            False,
            "NVIDIA Container Toolkit not installed: containers cannot reach the GPUs",
            "install nvidia-container-toolkit >= 1.17.8 and run "
            "`nvidia-ctk runtime configure --runtime=docker && systemctl restart docker`",
        )
    risky = [name for name in RISKY_FEATURES if features.get(name) is True]
    if risky:
        return ToolkitVerdict(
            False,
            f"NVIDIA Container Toolkit has {', '.join(f'features.{n}' for n in risky)} on: "
            "a container's own libraries reach the host's hooks (the escapes 1.17.8 closed)",
            f"remove {', '.join(risky)} from the [features] table of {TOOLKIT_CONFIG}",
        )
    parsed = parse_version(version)
    if parsed is None or parsed >= MIN_TOOLKIT:
        return ToolkitVerdict(True, "")
    if parsed >= MIN_WITH_WORKAROUND and features.get(WORKAROUND) is True:
        return ToolkitVerdict(
            True,
            "",
            warning=f"NVIDIA Container Toolkit {version} is below 1.17.8; "
            f"features.{WORKAROUND} (NVIDIA's workaround for CVE-2025-23266) is on",
            fix=UPGRADE,
        )
    workaround = (
        f"; or, until you can, set `{WORKAROUND} = true` under [features] in {TOOLKIT_CONFIG}"
        if parsed >= MIN_WITH_WORKAROUND
        else ""
    )
    cves = "CVE-2025-23266, CVE-2025-23267" + (
        ", CVE-2025-23359" if parsed < MIN_WITH_WORKAROUND else ""
    )
    return ToolkitVerdict(
        False,
        f"NVIDIA Container Toolkit {version} is below 1.17.8: vulnerable to {cves} "
        "(a container escapes to the host); GPU leases are refused",
        UPGRADE + workaround,
    )


class ToolkitGate:
    """Whether GPU leases may start here; read once, then on ``refresh``."""

    def __init__(
        self,
        version_source: Callable[[], str | None] = toolkit_version,
        features_source: Callable[[], dict[str, Any]] = read_features,
    ) -> None:
        self._version = version_source
        self._features = features_source
        self._lock = threading.Lock()
        self._verdict: ToolkitVerdict | None = None

    def refresh(self) -> ToolkitVerdict:
        """Blocking (runs ``nvidia-ctk --version``): call from a worker thread."""
        verdict = judge(self._version(), self._features())
        with self._lock:
            self._verdict = verdict
        if not verdict.gpu_leases:
            log.error("GPU leases refused: %s", verdict.problem, extra={"fix": verdict.fix})
        elif verdict.warning:
            log.warning(verdict.warning, extra={"fix": verdict.fix})
        return verdict

    def refusal(self) -> str | None:
        """Why GPU leases are refused now, or None (``refresh`` first)."""
        with self._lock:
            verdict = self._verdict
        if verdict is None or verdict.gpu_leases:
            return None
        return f"{verdict.problem} (fix: {verdict.fix})"

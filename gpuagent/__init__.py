"""Code shared by the agent and the reference scheduler.

Neither ``agent`` nor ``scheduler`` imports the other; both import this package:
the versioned protocol (``gpuagent.v1``), unit parsing, config loading and logging.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpu-provider-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

PROTOCOL_VERSION = "1.0"

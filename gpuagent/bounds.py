"""Size bounds on protocol messages, checked on receipt by both sides.

gRPC's max message size bounds the whole message; this bounds its parts, so a
peer cannot, say, send a Hello with a million GPUs in 4 MiB and have the other
side store and re-serve it. One generic walk over the descriptor keeps every
field covered, including fields added later; the few fields that are
legitimately larger are listed by full name.
"""

from __future__ import annotations

from google.protobuf.message import Message

from gpuagent import leaserules

MAX_STRING = 4096
MAX_BYTES = 4096
MAX_REPEATED = 1024
MAX_MAP = 256

# Fields allowed past the defaults; keyed by the field's full name.
LIMITS: dict[str, int] = {
    "gpuagent.v1.LeaseUpdate.log_tail": 64 * 1024,
    "gpuagent.v1.LeaseUpdate.endpoints": leaserules.MAX_PORTS,  # one per declared port
    "gpuagent.v1.UsageReport.records": 10_000,
    "gpuagent.v1.OpenedRow.values": 1024 * 1024,
    "gpuagent.v1.OpenedRow.proof": 64,
    "gpuagent.v1.Inventory.gpus": 64,
    "gpuagent.v1.Hello.gpu_health": 64,
    "gpuagent.v1.Heartbeat.gpu_health": 64,
}


class BoundsError(ValueError):
    """A field is too large; ``path`` names it (e.g. ``hello.inventory.gpus``)."""

    def __init__(self, path: str, size: int, limit: int) -> None:
        self.path = path
        super().__init__(f"{path}: {size} exceeds the limit of {limit}")


def check(message: Message, path: str = "") -> None:
    """Raise BoundsError for the first field over its limit."""
    for fd, value in message.ListFields():
        here = f"{path}.{fd.name}" if path else fd.name
        limit = LIMITS.get(fd.full_name)
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if is_map:
            _limit(here, len(value), limit or MAX_MAP)
            for key, item in value.items():
                _scalar(f"{here}[{key!r:.40}]", key, None)
                if isinstance(item, Message):
                    check(item, f"{here}[{key!r:.40}]")
                else:
                    _scalar(f"{here}[{key!r:.40}]", item, None)
            continue
        if fd.is_repeated:
            _limit(here, len(value), limit or MAX_REPEATED)
            for index, item in enumerate(value):
                if isinstance(item, Message):
                    check(item, f"{here}[{index}]")
                else:
                    _scalar(f"{here}[{index}]", item, None)
            continue
        if isinstance(value, Message):
            check(value, here)
        else:
            _scalar(here, value, limit)


def _scalar(path: str, value: object, limit: int | None) -> None:
    if isinstance(value, str):
        _limit(path, len(value), limit or MAX_STRING)
    elif isinstance(value, bytes):
        _limit(path, len(value), limit or MAX_BYTES)


def _limit(path: str, size: int, limit: int) -> None:
    if size > limit:
        raise BoundsError(path, size, limit)

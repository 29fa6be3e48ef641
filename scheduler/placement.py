"""Where a lease goes: filter the nodes, then pick by a documented score.

Pure functions over plain views of the registry, so the policy is unit-tested
without gRPC or a database.

A node is a candidate when all of these hold:

1. it is online with an open session, and not draining (by the operator or the
   agent itself);
2. the lease is not pinned to another node, and this node has not been offered
   this lease before (LeaseAssign is idempotent by lease id on the agent, so a
   node sees each lease id at most once; a re-placement goes elsewhere);
3. its ask price per GPU-hour is at most the lease's ceiling;
4. its tenant isolation meets ``placement.require_isolation`` (``isolation_block``);
5. it has at least ``gpu_count`` free GPUs that match: healthy, not cordoned,
   not held by any lease the scheduler placed there, name containing
   ``gpu_model`` (case-insensitive) and memory at least ``gpu_min_memory_bytes``.

Among candidates the lowest score wins, compared in order:

1. **ask price** (cheapest first: the buyer pays the node's ask, not the ceiling);
2. **best fit**: free GPUs the node would have left afterwards (fewest first, so
   small leases fill partly used nodes and whole nodes stay free for big ones);
3. **node id**, so equal nodes are chosen deterministically.

The GPUs taken are the first matching ones by NVML index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from gpuagent.v1 import inventory_pb2

_ISOLATION_STATUS = {
    inventory_pb2.Isolation.VERIFIED: "verified",
    inventory_pb2.Isolation.FAILED: "failed",
    inventory_pb2.Isolation.UNVERIFIED: "unverified",
    inventory_pb2.Isolation.DISABLED: "disabled",
}


def isolation_text(isolation: inventory_pb2.Isolation) -> str:
    """``verified``, ``failed: <what>``...: as the agent's log and ``nodes show`` say it."""
    status = _ISOLATION_STATUS.get(isolation.status, "not reported")
    return f"{status}: {isolation.detail}" if isolation.detail else status


def isolation_block(inventory: inventory_pb2.Inventory, require: bool | None) -> str:
    """Why a node's isolation keeps leases off it, or "" when it does not.

    ``require`` None (the default) requires a verified self-test from nodes that run
    the egress policy on real GPUs. Nodes whose GPUs are all simulated (demos, tests)
    protect nothing real and are exempt unless ``require`` is True; nodes without the
    policy (or too old to report it) are placed unless ``require`` is True.
    """
    isolation = inventory.isolation
    if require is None:
        simulated = bool(inventory.gpus) and all(g.simulated for g in inventory.gpus)
        require = isolation.egress_policy and not simulated
    if not require or isolation.status == inventory_pb2.Isolation.VERIFIED:
        return ""
    return f"isolation {isolation_text(isolation)}"


@dataclass(frozen=True)
class GpuView:
    uuid: str
    name: str
    memory_bytes: int
    index: int = 0


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node, read from the registry."""

    node_id: str
    online: bool
    draining: bool
    ask_micros: int
    # Free for a new lease: healthy, not cordoned, not held by a placed lease.
    free_gpus: tuple[GpuView, ...] = ()
    # Why the node is not online (e.g. "suspect", "not connected"), for the log.
    offline_reason: str = "offline"
    # Why its isolation keeps leases off it ("" = it does not): isolation_block.
    isolation_block: str = ""


@dataclass(frozen=True)
class Request:
    gpu_count: int
    gpu_model: str = ""
    gpu_min_memory_bytes: int = 0
    price_ceiling_micros: int = 0
    pinned_node_id: str = ""
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Placement:
    node_id: str
    gpu_uuids: tuple[str, ...]
    ask_micros: int
    leftover_gpus: int

    @property
    def score(self) -> tuple[int, int, str]:
        return (self.ask_micros, self.leftover_gpus, self.node_id)


@dataclass(frozen=True)
class Decision:
    placement: Placement | None
    candidates: int = 0
    # The nodes that were not candidates, and the request they were judged against:
    # their reasons are worded only when someone asks (a pass over a big fleet that
    # finds a node must not format thousands of strings nobody reads).
    rejected: tuple[NodeView, ...] = ()
    request: Request | None = None

    @cached_property
    def skipped(self) -> dict[str, str]:
        """node_id -> why it was not a candidate (only for nodes that were skipped)."""
        if self.request is None:
            return {}
        request = self.request
        return {n.node_id: why_not(n, request) or "" for n in self.rejected}

    @cached_property
    def _skipped_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(_reason_kind(r) for r in self.skipped.values()).items()))

    def skipped_counts(self) -> dict[str, int]:
        """How many nodes were skipped for each kind of reason (for logs).

        Worded once per decision: the summary and the log line both ask for it, and
        on a 10,000-node fleet that is 10,000 reasons each time a lease waits.
        """
        return self._skipped_counts

    def summary(self) -> str:
        """One line for logs and for the buyer: the choice, or why nothing fits."""
        if self.placement is not None:
            p = self.placement
            return (
                f"placed on {p.node_id} (ask {p.ask_micros}, {p.leftover_gpus} GPUs left; "
                f"best of {self.candidates} candidates)"
            )
        if not self.rejected:
            return "no nodes registered"
        # Group identical reasons so a big fleet gives a short line.
        counts = self.skipped_counts()
        parts = [f"{n} {kind}" if n > 1 else kind for kind, n in counts.items()]
        return "no node fits: " + "; ".join(parts)


def _reason_kind(reason: str) -> str:
    # Reasons are "<kind>: <detail>"; the detail is node-specific noise in a summary.
    return reason.split(":", 1)[0]


def matching_gpus(node: NodeView, request: Request) -> list[GpuView]:
    model = request.gpu_model.casefold()
    return sorted(
        (
            g
            for g in node.free_gpus
            if model in g.name.casefold() and g.memory_bytes >= request.gpu_min_memory_bytes
        ),
        key=lambda g: (g.index, g.uuid),
    )


def _matching_count(node: NodeView, request: Request) -> int:
    # No sort and, without a model or memory constraint, no per-GPU work: this runs
    # for every node of the fleet on every placement pass.
    if not request.gpu_model and request.gpu_min_memory_bytes <= 0:
        return len(node.free_gpus)
    model = request.gpu_model.casefold()
    return sum(
        1
        for g in node.free_gpus
        if model in g.name.casefold() and g.memory_bytes >= request.gpu_min_memory_bytes
    )


def why_not(node: NodeView, request: Request) -> str | None:
    """The reason ``node`` cannot take ``request``, or None when it can."""
    if request.pinned_node_id and node.node_id != request.pinned_node_id:
        return f"not pinned: lease is pinned to {request.pinned_node_id}"
    if node.node_id in request.excluded:
        return "already tried: this node was offered the lease before"
    if not node.online:
        return f"unavailable: {node.offline_reason}"
    if node.draining:
        return "draining: node accepts no new leases"
    if node.isolation_block:
        return f"not isolated: {node.isolation_block} (placement.require_isolation)"
    if node.ask_micros > request.price_ceiling_micros:
        return (
            f"too expensive: ask {node.ask_micros} > ceiling {request.price_ceiling_micros} "
            "micro-units per GPU-hour"
        )
    matching = _matching_count(node, request)
    if matching < request.gpu_count:
        what = "free GPUs"
        if request.gpu_model or request.gpu_min_memory_bytes:
            what = "free GPUs matching the model/memory"
        return f"not enough GPUs: {matching} {what} < {request.gpu_count} wanted"
    return None


def choose(nodes: Iterable[NodeView], request: Request) -> Decision:
    """The best node and GPUs for ``request``; ``Decision.skipped`` says why not the others.

    The loop inlines ``why_not``'s tests (same order, same outcome; the reasons are
    worded later, on demand): it runs for every node of the fleet on every pass.
    """
    rejected: list[NodeView] = []
    best: NodeView | None = None
    best_score: tuple[int, int, str] | None = None
    candidates = 0
    pinned, excluded = request.pinned_node_id, request.excluded
    ceiling, wanted = request.price_ceiling_micros, request.gpu_count
    plain = not request.gpu_model and request.gpu_min_memory_bytes <= 0
    for node in nodes:
        if (
            (pinned and node.node_id != pinned)
            or node.node_id in excluded
            or not node.online
            or node.draining
            or node.ask_micros > ceiling
            or (len(node.free_gpus) if plain else _matching_count(node, request)) < wanted
        ):
            rejected.append(node)
            continue
        candidates += 1
        score = (node.ask_micros, len(node.free_gpus) - wanted, node.node_id)
        if best_score is None or score < best_score:
            best, best_score = node, score
    if best is None:
        return Decision(None, candidates, tuple(rejected), request)
    # GPUs are picked for the winner only: sorting every candidate's GPUs is what
    # made a pass over a 10,000-node fleet slow.
    gpus = matching_gpus(best, request)[:wanted]
    chosen = Placement(
        node_id=best.node_id,
        gpu_uuids=tuple(g.uuid for g in gpus),
        ask_micros=best.ask_micros,
        leftover_gpus=len(best.free_gpus) - wanted,
    )
    return Decision(chosen, candidates, tuple(rejected), request)


def take(nodes: Sequence[NodeView], placement: Placement) -> list[NodeView]:
    """``nodes`` with the placed GPUs no longer free (several leases per pass)."""
    taken = set(placement.gpu_uuids)
    out = list(nodes)
    for i, n in enumerate(out):
        if n.node_id == placement.node_id:
            out[i] = NodeView(
                n.node_id,
                n.online,
                n.draining,
                n.ask_micros,
                tuple(g for g in n.free_gpus if g.uuid not in taken),
                n.offline_reason,
            )
            break
    return out

"""Where a lease goes: filter the nodes, then pick by a documented score.

Pure functions over plain views of the registry, so the policy is unit-tested
without gRPC or a database.

A node is a candidate when all of these hold:

1. it is online with an open session, and not draining (by the operator or the
   agent itself);
2. the lease is not pinned to another node, and this node has not been offered
   this lease before (LeaseAssign is idempotent by lease id on the agent, so a
   node sees each lease id at most once; a re-placement goes elsewhere);
3. its tenant isolation meets ``placement.require_isolation`` (``isolation_block``);
4. it meets the lease's market constraints (``market_block``): its location's region
   and country, its uptime over 30 days, the labels the provider set
   (``node_selector``), its *measured* bandwidth (a declared NIC speed never counts)
   and its free scratch storage;
5. its ask per GPU-hour for the GPUs it would give is at most the lease's ceiling;
6. it has at least ``gpu_count`` free GPUs that match: healthy, not cordoned,
   not held by any lease the scheduler placed there, name containing
   ``gpu_model`` (case-insensitive) and memory at least ``gpu_min_memory_bytes``.

Among candidates the lowest score wins, compared in order:

1. **ask price** (cheapest first: the buyer pays the node's ask, not the ceiling);
2. **best fit**: free GPUs the node would have left afterwards (fewest first, so
   small leases fill partly used nodes and whole nodes stay free for big ones);
3. **uptime** over 30 days (highest first);
4. **measured bandwidth** (highest first);
5. **node id**, so equal nodes are chosen deterministically.

A node asks a price per GPU model (docs/market.md). The GPUs taken are the cheapest
matching ones, then the first by NVML index; the lease's price is the highest ask
among them (one price per lease; on a node of one model, that model's ask).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from gpuagent import market
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
    ask_micros: int = 0  # the node's ask for this GPU's model, per GPU-hour


@dataclass(frozen=True)
class NodeMarket:
    """What a buyer's constraints read about a node: its offer and its record."""

    region: str = ""
    country: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    uptime_30d: float = 0.0
    bandwidth_bps: int = 0  # measured; 0 = never (or the last probe failed)
    scratch_free_bytes: int | None = None  # None = the node does not say


NO_MARKET = NodeMarket()


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
    market: NodeMarket = NO_MARKET
    # Every free GPU asks ask_micros (one model, or models at one price): placement
    # needs no per-GPU price work. False: asks differ, ask_micros is the lowest.
    uniform_price: bool = True


@dataclass(frozen=True)
class Request:
    gpu_count: int
    gpu_model: str = ""
    gpu_min_memory_bytes: int = 0
    price_ceiling_micros: int = 0
    pinned_node_id: str = ""
    excluded: frozenset[str] = frozenset()
    # Market constraints (LeaseSpec.constraints); empty = any.
    region: str = ""
    countries: frozenset[str] = frozenset()
    min_uptime: float = 0.0
    node_selector: tuple[tuple[str, str], ...] = ()
    min_bandwidth_bps: int = 0
    scratch_bytes: int = 0

    @cached_property
    def kinds(self) -> dict[str, str]:
        """The reason kinds of the market constraints, worded once per request."""
        return {
            "region": f"outside region {self.region}",
            "countries": f"outside countries {','.join(sorted(self.countries))}",
            "uptime": f"uptime below {self.min_uptime:.2%}",
            "bandwidth": f"bandwidth below {format_bps(self.min_bandwidth_bps)}",
        }

    @cached_property
    def constrained(self) -> bool:
        """Any market constraint set: placement checks them (else it skips the work)."""
        return bool(
            self.region
            or self.countries
            or self.min_uptime > 0
            or self.node_selector
            or self.min_bandwidth_bps
            or self.scratch_bytes
        )


@dataclass(frozen=True)
class Placement:
    node_id: str
    gpu_uuids: tuple[str, ...]
    ask_micros: int
    leftover_gpus: int

    uptime_30d: float = 0.0
    bandwidth_bps: int = 0
    gpu_model: str = ""

    @property
    def score(self) -> tuple[int, int, float, int, str]:
        return (
            self.ask_micros,
            self.leftover_gpus,
            -self.uptime_30d,
            -self.bandwidth_bps,
            self.node_id,
        )


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
        request = self.request
        if request is None:
            return {}
        # Kinds only: the details are not worded for a count.
        kinds = Counter((_why(n, request) or ("", str))[0] for n in self.rejected)
        return dict(sorted(kinds.items()))

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
                f"placed on {p.node_id} (ask {p.ask_micros}, {p.leftover_gpus} GPUs left, "
                f"uptime {p.uptime_30d:.1%}, {format_bps(p.bandwidth_bps)}; "
                f"best of {self.candidates} candidates: cheapest, then best fit, "
                "then uptime, then bandwidth)"
            )
        if not self.rejected:
            return "no nodes registered"
        # Group identical reasons so a big fleet gives a short line.
        counts = self.skipped_counts()
        parts = [f"{n} {kind}" if n > 1 else kind for kind, n in counts.items()]
        return "no node fits: " + "; ".join(parts)


def format_bps(bps: int) -> str:
    """1.2 Gbit/s, 850 Mbit/s; "bandwidth not measured" for 0."""
    return market.format_bps(bps) if bps > 0 else "bandwidth not measured"


# A reason: its kind ("outside region eu", what waiting: lines count) and its detail,
# worded only when asked for (counting 10,000 skipped nodes must not format 10,000
# strings).
Why = tuple[str, Callable[[], str]]


def market_block(node: NodeView, request: Request) -> str | None:
    """Why ``node`` fails the lease's market constraints, or None when it meets them.

    The kind (before the colon) names the constraint, so ``waiting:`` counts read
    "3 outside region eu"; the detail names the node's value.
    """
    why = _market_why(node, request)
    return None if why is None else f"{why[0]}: {why[1]()}"


def _market_why(node: NodeView, request: Request) -> Why | None:
    m = node.market
    if request.region and m.region != request.region:
        return request.kinds["region"], lambda: f"node is in {m.region or 'no region'}"
    if request.countries and m.country not in request.countries:
        return request.kinds["countries"], lambda: f"node is in {m.country or 'no country'}"
    if request.min_uptime > 0 and m.uptime_30d < request.min_uptime:
        return request.kinds["uptime"], lambda: f"node has {m.uptime_30d:.2%} over 30 days"
    for key, value in request.node_selector:
        have = m.labels.get(key)
        if have != value:
            return (
                "labels do not match",
                lambda key=key, have=have: (
                    f"node has {key}={have}" if have is not None else f"node has no label {key}"
                ),
            )
    if request.min_bandwidth_bps and m.bandwidth_bps < request.min_bandwidth_bps:
        return request.kinds["bandwidth"], lambda: f"node measured {format_bps(m.bandwidth_bps)}"
    if (
        request.scratch_bytes
        and m.scratch_free_bytes is not None
        and m.scratch_free_bytes < request.scratch_bytes
    ):
        return (
            "not enough scratch",
            lambda: f"{m.scratch_free_bytes} bytes free < {request.scratch_bytes} wanted",
        )
    return None


def _selected(labels: Mapping[str, str], selector: tuple[tuple[str, str], ...]) -> bool:
    for key, value in selector:  # noqa: SIM110 - cheaper than all(genexpr), per node per pass
        if labels.get(key) != value:
            return False
    return True


def matching_gpus(node: NodeView, request: Request) -> list[GpuView]:
    """The free GPUs that match, cheapest first, then by NVML index."""
    model = request.gpu_model.casefold()
    return sorted(
        (
            g
            for g in node.free_gpus
            if model in g.name.casefold() and g.memory_bytes >= request.gpu_min_memory_bytes
        ),
        key=lambda g: (g.ask_micros, g.index, g.uuid),
    )


def lease_ask(node: NodeView, request: Request) -> int:
    """The price per GPU-hour ``request`` would pay on ``node``: its ask, or on a node
    whose models ask differently, the highest ask of the cheapest matching GPUs (the
    node's lowest ask when too few match: the count check refuses it then)."""
    if node.uniform_price:
        return node.ask_micros
    gpus = matching_gpus(node, request)[: request.gpu_count]
    return max((g.ask_micros for g in gpus), default=node.ask_micros)


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
    why = _why(node, request)
    return None if why is None else f"{why[0]}: {why[1]()}"


def _why(node: NodeView, request: Request) -> Why | None:
    """The one order of the candidate tests (module docstring), as (kind, detail)."""
    if request.pinned_node_id and node.node_id != request.pinned_node_id:
        return "not pinned", lambda: f"lease is pinned to {request.pinned_node_id}"
    if node.node_id in request.excluded:
        return "already tried", lambda: "this node was offered the lease before"
    if not node.online:
        return "unavailable", lambda: node.offline_reason
    if node.draining:
        return "draining", lambda: "node accepts no new leases"
    if node.isolation_block:
        return "not isolated", lambda: f"{node.isolation_block} (placement.require_isolation)"
    if request.constrained:
        blocked = _market_why(node, request)
        if blocked is not None:
            return blocked
    ask = lease_ask(node, request)
    if ask > request.price_ceiling_micros:
        return (
            "too expensive",
            lambda: f"ask {ask} > ceiling {request.price_ceiling_micros} micro-units per GPU-hour",
        )
    matching = _matching_count(node, request)
    if matching < request.gpu_count:
        what = "free GPUs"
        if request.gpu_model or request.gpu_min_memory_bytes:
            what = "free GPUs matching the model/memory"
        return "not enough GPUs", lambda: f"{matching} {what} < {request.gpu_count} wanted"
    return None


def choose(
    nodes: Iterable[NodeView], request: Request, unavailable: Sequence[NodeView] = ()
) -> Decision:
    """The best node and GPUs for ``request``; ``Decision.skipped`` says why not the others.

    The loop inlines ``why_not``'s tests (same outcome; the reasons are worded later,
    on demand, by ``why_not`` in its order): it runs for every node of the fleet on
    every pass. ``unavailable`` are nodes known to be no candidate for any lease (not
    online): counted among the rejected, with their reasons, without being tested.
    """
    rejected: list[NodeView] = []
    best: NodeView | None = None
    best_score: tuple[int, int, float, int, str] | None = None
    best_ask = 0
    candidates = 0
    pinned, excluded = request.pinned_node_id, request.excluded
    ceiling, wanted = request.price_ceiling_micros, request.gpu_count
    plain = not request.gpu_model and request.gpu_min_memory_bytes <= 0
    constrained = request.constrained
    region, countries, min_uptime = request.region, request.countries, request.min_uptime
    selector, min_bps, scratch = (
        request.node_selector,
        request.min_bandwidth_bps,
        request.scratch_bytes,
    )
    for node in nodes:
        if (
            (pinned and node.node_id != pinned)
            or node.node_id in excluded
            or not node.online
            or node.draining
            or node.isolation_block
            or node.ask_micros > ceiling
            or (len(node.free_gpus) if plain else _matching_count(node, request)) < wanted
        ):
            rejected.append(node)
            continue
        if constrained:
            # market_block's tests inlined (the outcome, not the order, is what counts
            # here: reasons are worded by why_not, on demand); cheapest first.
            m = node.market
            if (
                (region and m.region != region)
                or (countries and m.country not in countries)
                or (min_uptime > 0 and m.uptime_30d < min_uptime)
                or (min_bps and m.bandwidth_bps < min_bps)
                or (scratch and m.scratch_free_bytes is not None and m.scratch_free_bytes < scratch)
                or (selector and not _selected(m.labels, selector))
            ):
                rejected.append(node)
                continue
        ask = node.ask_micros if node.uniform_price else lease_ask(node, request)
        if ask > ceiling:
            rejected.append(node)
            continue
        candidates += 1
        if best_score is not None and ask > best_score[0]:
            continue  # dearer than the best so far: the rest of the score cannot matter
        m = node.market
        score = (
            ask,
            len(node.free_gpus) - wanted,
            -m.uptime_30d,
            -m.bandwidth_bps,
            node.node_id,
        )
        if best_score is None or score < best_score:
            best, best_score, best_ask = node, score, ask
    if unavailable:
        rejected.extend(unavailable)
    if best is None:
        return Decision(None, candidates, tuple(rejected), request)
    # GPUs are picked for the winner only: sorting every candidate's GPUs is what
    # made a pass over a 10,000-node fleet slow.
    gpus = matching_gpus(best, request)[:wanted]
    chosen = Placement(
        node_id=best.node_id,
        gpu_uuids=tuple(g.uuid for g in gpus),
        ask_micros=best_ask,
        leftover_gpus=len(best.free_gpus) - wanted,
        uptime_30d=best.market.uptime_30d,
        bandwidth_bps=best.market.bandwidth_bps,
        gpu_model=gpus[0].name if gpus else "",
    )
    return Decision(chosen, candidates, tuple(rejected), request)


def take(nodes: Sequence[NodeView], placement: Placement) -> list[NodeView]:
    """``nodes`` with the placed GPUs no longer free (several leases per pass)."""
    taken = set(placement.gpu_uuids)
    out = list(nodes)
    for i, n in enumerate(out):
        if n.node_id == placement.node_id:
            # replace(): every other field (isolation, market, prices) stays as it was.
            out[i] = replace(n, free_gpus=tuple(g for g in n.free_gpus if g.uuid not in taken))
            break
    return out

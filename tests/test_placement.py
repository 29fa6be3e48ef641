"""Placement policy: candidate filters and the documented score (no gRPC, no database)."""

from __future__ import annotations

from typing import Any

from scheduler.placement import GpuView, NodeView, Request, choose, take, why_not

GIB = 1024**3


def _gpus(
    node: str, n: int, name: str = "NVIDIA GeForce RTX 4090", mem: int = 24
) -> tuple[GpuView, ...]:
    return tuple(GpuView(f"{node}-gpu{i}", name, mem * GIB, i) for i in range(n))


def _node(node_id: str, gpus: int = 2, ask: int = 100, **kw: object) -> NodeView:
    fields: dict[str, object] = {
        "online": True,
        "draining": False,
        "free_gpus": _gpus(node_id, gpus),
    }
    fields.update(kw)
    return NodeView(node_id=node_id, ask_micros=ask, **fields)  # type: ignore[arg-type]


def test_cheapest_ask_wins_over_better_fit() -> None:
    """Price is compared first: a cheaper node wins even when another fits tighter."""
    nodes = [_node("tight", gpus=1, ask=200), _node("cheap", gpus=8, ask=100)]
    decision = choose(nodes, Request(gpu_count=1, price_ceiling_micros=500))
    assert decision.placement is not None
    assert decision.placement.node_id == "cheap"
    assert decision.placement.ask_micros == 100


def test_best_fit_breaks_price_ties() -> None:
    """At equal price the node left with the fewest free GPUs wins (bin packing)."""
    nodes = [_node("big", gpus=8), _node("small", gpus=2), _node("exact", gpus=1)]
    decision = choose(nodes, Request(gpu_count=1, price_ceiling_micros=100))
    assert decision.placement is not None
    assert decision.placement.node_id == "exact"
    assert decision.placement.leftover_gpus == 0
    assert decision.candidates == 3


def test_node_id_breaks_full_ties_deterministically() -> None:
    """Identical nodes: the smallest node id, whatever the input order."""
    for order in (["b", "a", "c"], ["c", "b", "a"]):
        decision = choose([_node(n) for n in order], Request(gpu_count=1, price_ceiling_micros=100))
        assert decision.placement is not None and decision.placement.node_id == "a"


def test_first_matching_gpus_by_index_are_taken() -> None:
    """GPUs are taken in NVML index order among those matching model and memory."""
    gpus = (
        GpuView("u3", "NVIDIA H100 80GB HBM3", 80 * GIB, 3),
        GpuView("u0", "NVIDIA GeForce RTX 4090", 24 * GIB, 0),
        GpuView("u1", "NVIDIA H100 80GB HBM3", 80 * GIB, 1),
        GpuView("u2", "NVIDIA H100 80GB HBM3", 80 * GIB, 2),
    )
    node = NodeView("n", True, False, 0, gpus)
    decision = choose([node], Request(gpu_count=2, gpu_model="h100", gpu_min_memory_bytes=40 * GIB))
    assert decision.placement is not None
    assert decision.placement.gpu_uuids == ("u1", "u2")


def test_each_filter_gives_its_reason() -> None:
    """Offline, draining, over the ceiling, too few (matching) GPUs, pinned elsewhere and
    already tried each exclude a node, with a reason naming the cause."""
    request = Request(gpu_count=2, price_ceiling_micros=150, excluded=frozenset({"tried"}))
    cases = {
        "off": _node("off", online=False, offline_reason="suspect"),
        "drain": _node("drain", draining=True),
        "pricey": _node("pricey", ask=151),
        "small": _node("small", gpus=1),
        "tried": _node("tried"),
    }
    reasons = {k: why_not(v, request) for k, v in cases.items()}
    assert reasons["off"] == "unavailable: suspect"
    assert reasons["drain"] is not None and reasons["drain"].startswith("draining")
    assert reasons["pricey"] is not None and "ask 151 > ceiling 150" in reasons["pricey"]
    assert reasons["small"] == "not enough GPUs: 1 free GPUs < 2 wanted"
    assert reasons["tried"] is not None and reasons["tried"].startswith("already tried")
    assert why_not(_node("ok"), request) is None
    pinned = Request(gpu_count=1, price_ceiling_micros=150, pinned_node_id="ok")
    assert why_not(_node("other"), pinned) == "not pinned: lease is pinned to ok"
    assert why_not(_node("ok"), pinned) is None
    wrong_model = Request(gpu_count=1, gpu_model="H100", price_ceiling_micros=150)
    assert "matching the model/memory" in (why_not(_node("ok"), wrong_model) or "")


def test_ask_equal_to_ceiling_is_accepted() -> None:
    """The ceiling is inclusive: ask <= ceiling."""
    assert why_not(_node("n", ask=150), Request(gpu_count=1, price_ceiling_micros=150)) is None


def test_no_fit_summary_groups_reasons() -> None:
    """The buyer-facing summary counts nodes per reason instead of listing each node."""
    nodes = [_node("a", online=False), _node("b", online=False), _node("c", ask=999)]
    decision = choose(nodes, Request(gpu_count=1, price_ceiling_micros=100))
    assert decision.placement is None
    assert decision.summary() == "no node fits: too expensive; 2 unavailable"
    assert choose([], Request(gpu_count=1)).summary() == "no nodes registered"


def test_take_removes_placed_gpus_for_the_next_lease() -> None:
    """Within one pass, GPUs given to one lease are not offered to the next."""
    nodes = [_node("a", gpus=2)]
    request = Request(gpu_count=2, price_ceiling_micros=100)
    first = choose(nodes, request).placement
    assert first is not None
    after = take(nodes, first)
    assert after[0].free_gpus == ()
    assert choose(after, request).placement is None


def _inventory(status: int, policy: bool = True, simulated: bool = False) -> Any:
    from gpuagent.v1 import inventory_pb2

    return inventory_pb2.Inventory(
        gpus=[inventory_pb2.GpuInfo(uuid="GPU-1", simulated=simulated)],
        isolation=inventory_pb2.Isolation(
            status=status, detail="lease network a reached the host", egress_policy=policy
        ),
    )


def test_isolation_requirement_defaults_to_real_gpus_with_the_policy_on() -> None:
    """By default a real-GPU node with the egress policy on needs a verified self-test;
    simulated nodes and nodes without the policy are exempt; require_isolation true
    requires it of every node and false of none. why_not names the cause."""
    from gpuagent.v1 import inventory_pb2
    from scheduler.placement import isolation_block

    verified, failed = inventory_pb2.Isolation.VERIFIED, inventory_pb2.Isolation.FAILED
    assert isolation_block(_inventory(verified), None) == ""
    block = isolation_block(_inventory(failed), None)
    assert block == "isolation failed: lease network a reached the host"
    assert isolation_block(_inventory(failed, simulated=True), None) == ""
    assert isolation_block(_inventory(failed, policy=False), None) == ""
    assert isolation_block(_inventory(failed, simulated=True), True) != ""
    assert isolation_block(inventory_pb2.Inventory(), True) == "isolation not reported"
    assert isolation_block(_inventory(failed), False) == ""
    node = NodeView("n1", online=True, draining=False, ask_micros=0, isolation_block=block)
    reason = why_not(node, Request(gpu_count=0))
    assert reason is not None and reason.startswith("not isolated: isolation failed")


def test_nodes_passed_as_unavailable_decide_as_if_they_were_tested() -> None:
    """A pass hands the nodes held by another replica to choose as ``unavailable``
    (untested): the choice, the candidate count and every reason are those of the one
    list, so a lease pinned to such a node, or tried everywhere else, reads the same."""
    away = [_node(f"away-{i}", online=False, offline_reason="not connected") for i in range(3)]
    here = [_node("a", ask=300), _node("b", ask=200, gpus=1), _node("c", online=False)]
    for request in (
        Request(gpu_count=1, price_ceiling_micros=500),
        Request(gpu_count=1, price_ceiling_micros=500, pinned_node_id="away-1"),
        Request(gpu_count=1, price_ceiling_micros=500, excluded=frozenset({"a", "b"})),
        Request(gpu_count=4, price_ceiling_micros=500),
    ):
        split, whole = choose(here, request, away), choose(here + away, request)
        assert split.placement == whole.placement
        assert split.candidates == whole.candidates
        assert split.skipped == whole.skipped
        assert split.skipped_counts() == whole.skipped_counts()
        assert split.summary() == whole.summary()

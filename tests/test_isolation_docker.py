"""Tenant isolation against the real engine and real iptables.

Traffic goes only to containers these tests start, to the LAN namespace they make
(``tests.netns``) and to host addresses on that namespace's veth, never anywhere else.
Each test's firewall chain, bridge prefix and subnet pool are its own
(``tests.isolation_helpers``), so concurrent runs on this host do not interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from agent.isolation.selftest import SelfTest
from agent.leases import DockerRuntime, LeaseManager, LeaseState
from tests.netns import PORT, Lan, make_lan
from tests.test_lease_docker import LeaseEnv, lease_env_factory

__all__ = ["lease_env_factory"]  # fixture shared with the lifecycle tests

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and iptables need root"),
]

LISTEN_PORT = 8080
# Each lease serves LISTEN_PORT, waits for the test to write /scratch/go (lines of
# "name address port"), probes every target at once, prints "<name> open|closed", exits.
PROBE = f"""
httpd -p {LISTEN_PORT} -h /scratch
while [ ! -f /scratch/go ]; do sleep 0.05; done
while read name address port; do
  ( if nc -w 4 "$address" "$port" </dev/null >/dev/null 2>&1
    then echo "$name open"; else echo "$name closed"; fi ) &
done < /scratch/go
wait
"""


@pytest.fixture
def lan() -> Iterator[Lan]:
    namespace = make_lan()
    yield namespace
    namespace.close()


@contextlib.asynccontextmanager
async def running(env: LeaseEnv) -> AsyncIterator[LeaseManager]:
    manager = env.manager()
    await env.start(manager)
    try:
        yield manager
    finally:
        for stop, task in env.runs:
            stop.set()
            await asyncio.wait_for(task, 10)
        env.runs.clear()


def container_ip(env: LeaseEnv, lease_id: str) -> str:
    update = env.last(lease_id)
    attrs = env.client.containers.get(update.container_id).attrs
    (network,) = attrs["NetworkSettings"]["Networks"].values()
    return str(network["IPAddress"])


def go(env: LeaseEnv, manager: LeaseManager, lease_id: str, targets: list[str]) -> None:
    scratch = manager._runtime.scratch_dir(lease_id)
    tmp = scratch / "go.tmp"
    tmp.write_text("".join(f"{t}\n" for t in targets))
    tmp.rename(scratch / "go")


def results(env: LeaseEnv, lease_id: str) -> dict[str, str]:
    lines = env.last(lease_id).log_tail.split()
    return dict(zip(lines[::2], lines[1::2], strict=True))


async def probe_two_leases(env: LeaseEnv, lan: Lan) -> tuple[dict[str, str], dict[str, str], bool]:
    """Leases a and b probe each other, the LAN, the host and "the internet".

    Also returns whether the host itself reaches b's listener: it proves the peer
    listener was up, so "peer closed" means blocked, not absent.
    """
    host_server = await asyncio.start_server(lambda _r, w: w.close(), host=lan.host_ip, port=PORT)
    try:
        async with running(env) as manager:
            for lease_id in ("a", "b"):
                await manager.assign(lease_id, env.spec(PROBE))
            for lease_id in ("a", "b"):
                await env.wait_state(lease_id, LeaseState.RUNNING)
            ips = {lease_id: container_ip(env, lease_id) for lease_id in ("a", "b")}
            _, writer = await asyncio.wait_for(asyncio.open_connection(ips["b"], LISTEN_PORT), 5)
            writer.close()
            host_reaches_peer = True
            common = [
                f"lan {lan.lan_ip} {PORT}",
                f"allowed {lan.allowed_ip} {PORT}",
                f"host {lan.host_ip} {PORT}",
                f"internet {lan.internet_ip} {PORT}",
            ]
            go(env, manager, "a", [f"peer {ips['b']} {LISTEN_PORT}", *common])
            go(env, manager, "b", [f"peer {ips['a']} {LISTEN_PORT}", *common])
            for lease_id in ("a", "b"):
                await env.wait_state(lease_id, LeaseState.SUCCEEDED)
        return results(env, "a"), results(env, "b"), host_reaches_peer
    finally:
        host_server.close()
        await host_server.wait_closed()


@pytest.mark.asyncio
async def test_policy_on_keeps_a_lease_off_its_peer_the_lan_and_the_host(
    lease_env_factory: Callable[..., LeaseEnv], lan: Lan
) -> None:
    """With the egress policy on, lease a cannot open TCP to lease b nor b to a, nor
    either to a LAN machine or a host address; an allow-listed LAN address and a public
    one (TEST-NET-2 in the namespace) stay reachable."""
    env = lease_env_factory(egress_allow=[f"{lan.allowed_ip}/32"])
    a, b, host_reaches_peer = await probe_two_leases(env, lan)
    assert host_reaches_peer
    expected = {"peer": "closed", "lan": "closed", "host": "closed"}
    expected |= {"allowed": "open", "internet": "open"}
    assert a == expected
    assert b == expected


@pytest.mark.asyncio
async def test_policy_off_the_same_probes_connect(
    lease_env_factory: Callable[..., LeaseEnv], lan: Lan
) -> None:
    """With the policy off the LAN and host probes connect: the previous test's
    'closed' is the policy's doing. The peer stays closed: leases sit on separate
    bridges, which Docker itself isolates (the per-lease network's job)."""
    env = lease_env_factory(egress_policy=False)
    a, b, host_reaches_peer = await probe_two_leases(env, lan)
    assert host_reaches_peer
    expected = {"peer": "closed", "lan": "open", "host": "open"}
    expected |= {"allowed": "open", "internet": "open"}
    assert a == expected
    assert b == expected


@pytest.mark.asyncio
async def test_published_port_is_bound_to_the_configured_address_only(
    lease_env_factory: Callable[..., LeaseEnv], lan: Lan
) -> None:
    """A lease's port is published on 127.0.0.1 (the default publish_address), never
    0.0.0.0 or [::]: it answers on loopback but not on the host's LAN address."""
    env = lease_env_factory()
    async with running(env) as manager:
        spec = env.spec(
            f"httpd -f -p {LISTEN_PORT} -h /scratch", ports=[{"container_port": LISTEN_PORT}]
        )
        await manager.assign("web", spec)
        update = await env.wait_state("web", LeaseState.RUNNING)
        attrs = env.client.containers.get(update.container_id).attrs
        bindings = attrs["HostConfig"]["PortBindings"][f"{LISTEN_PORT}/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        published = attrs["NetworkSettings"]["Ports"][f"{LISTEN_PORT}/tcp"]
        assert {p["HostIp"] for p in published} == {"127.0.0.1"}
        host_port = int(published[0]["HostPort"])
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", host_port), 5)
        writer.close()
        assert not await asyncio.to_thread(lan.connects, lan.host_ip, host_port)
        await manager.cancel("web")
        await env.wait_state("web", LeaseState.CANCELLED)


def chain_rules(env: LeaseEnv) -> list[str]:
    saved = subprocess.run(
        ["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True
    ).stdout
    chain = env.config.isolation.firewall_chain
    return [line for line in saved.splitlines() if chain in line]


def flush_our_rules(env: LeaseEnv) -> None:
    chain = env.config.isolation.firewall_chain
    interfaces = env.config.isolation.bridge_prefix + "+"
    subprocess.run(["iptables", "-F", f"{chain}-FWD"], check=True)
    subprocess.run(["iptables", "-D", "INPUT", "-i", interfaces, "-j", f"{chain}-IN"], check=True)


@pytest.mark.asyncio
async def test_restart_readopts_the_network_and_rules_without_duplicates(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """An agent restart re-adopts a running lease's network (one, not two) and leaves
    one copy of each rule; a flushed chain (what a Docker restart or firewall reload
    does) is restored before the next lease starts."""
    env = lease_env_factory()
    async with running(env) as manager:
        await manager.assign("keep", env.spec("sleep 300"))
        await env.wait_state("keep", LeaseState.RUNNING)
    rules = chain_rules(env)
    assert len(rules) == len(set(rules)) > 0

    async with running(env) as manager:
        assert [v.state for v in manager.snapshot().leases] == [LeaseState.RUNNING]
        keep = env.client.containers.get(env.last("keep").container_id)
        (network,) = keep.attrs["NetworkSettings"]["Networks"]
        spares = env.config.isolation.spare_networks
        # The lease's network once, plus spares up to the configured count, no more.
        names = [n.name for n in env.networks()]
        assert names.count(network) == 1
        assert len(names) <= 1 + spares
        assert chain_rules(env) == rules

        # What a Docker restart or a firewalld reload does to the agent's rules.
        await asyncio.to_thread(flush_our_rules, env)
        assert chain_rules(env) != rules
        await manager.assign("next", env.spec("true"))
        await env.wait_state("next", LeaseState.RUNNING)
        assert sorted(chain_rules(env)) == sorted(rules)
        await env.wait_state("next", LeaseState.SUCCEEDED)
        await manager.cancel("keep")
        await env.wait_state("keep", LeaseState.CANCELLED)
    assert env.networks(spares=False) == []
    assert network not in [n.name for n in env.networks()]


@pytest.mark.asyncio
async def test_network_none_lease_has_no_network(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """network_mode none: no lease network is made and the container has only lo."""
    env = lease_env_factory()
    async with running(env) as manager:
        await manager.assign("offline", env.spec("ls /sys/class/net", network_mode="none"))
        update = await env.wait_state("offline", LeaseState.SUCCEEDED)
        assert update.log_tail.split() == ["lo"]
        assert env.networks(spares=False) == []


def _runtime(env: LeaseEnv) -> DockerRuntime:
    return DockerRuntime(
        env.client,
        env.config.runtime,
        env.node_id,
        env.state_dir / "scratch",
        isolation=env.config.isolation,
    )


@pytest.mark.asyncio
async def test_self_test_verifies_isolation_with_the_policy_on(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """Two probes on two lease networks reach neither each other nor the host listener:
    verified. The probes and their networks are gone afterwards."""
    env = lease_env_factory()
    result = await SelfTest(_runtime(env), env.image).run()
    assert (result.status, result.detail) == ("verified", "")
    assert env.containers() == [] and env.networks() == []


@pytest.mark.asyncio
async def test_self_test_fails_with_the_policy_off_and_says_what_leaked(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """With the policy off the probes reach the host: failed, naming the path. (They
    still do not reach each other: separate bridges.)"""
    env = lease_env_factory(egress_policy=False)
    result = await SelfTest(_runtime(env), env.image).run()
    assert result.status == "failed"
    assert "lease network a reached the host" in result.detail
    assert "reached lease network" not in result.detail
    assert env.containers() == [] and env.networks() == []


@pytest.mark.asyncio
async def test_self_test_without_its_image_is_unverified_and_pulls_nothing(
    lease_env_factory: Callable[..., LeaseEnv],
) -> None:
    """An absent probe image gives unverified with the docker pull to run."""
    env = lease_env_factory()
    result = await SelfTest(_runtime(env), "gpu-agent-test/absent:never").run()
    assert result.status == "unverified"
    assert "docker pull gpu-agent-test/absent:never" in result.detail

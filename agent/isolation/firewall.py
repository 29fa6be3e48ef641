"""The egress policy: iptables rules that keep leases off the LAN and off the host.

Two chains of the agent's own per address family, entered only from lease
bridges (``-i <bridge_prefix>+``), so no other container on the host is touched:

- ``<chain>-FWD``, jumped to from Docker's ``DOCKER-USER`` (``FORWARD`` when Docker
  does not manage that family), rejects forwarded traffic to private, shared,
  link-local and multicast ranges; everything else (the internet) passes on to
  Docker's own rules;
- ``<chain>-IN``, jumped to from ``INPUT``, rejects new connections to any address of
  the host itself (the bridge gateway, the LAN address, a public one alike).

Replies to connections made *to* a lease (a published port) pass both as
ESTABLISHED. Allowed CIDRs (a local model cache) return before the rejects.

Rules are written with one ``iptables-restore --noflush`` per family, so a check
that finds them intact costs one ``iptables-save`` per family and a repair is
atomic. Docker rewrites the filter table when it restarts and firewalld reloads
drop foreign rules; ``ensure`` is therefore called periodically, after the Docker
events stream reconnects, and before every lease starts. Blocking (subprocess):
call from a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import IsolationConfig
from ..hosttools import run_tool

log = logging.getLogger(__name__)

# What a lease never reaches unless allowed: RFC 1918, shared address space (RFC 6598),
# link-local (the cloud metadata address 169.254.169.254), multicast; "this network"
# and the reserved 240/4 are unroutable anyway and only ever probe local stacks.
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
# Unique local, link-local, multicast.
BLOCKED_V6 = ("fc00::/7", "fe80::/10", "ff00::/8")

Runner = Callable[[Sequence[str], str | None], str]


class FirewallError(Exception):
    """The rules could not be read or written; the message says which command failed."""


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        done = run_tool(argv, stdin, timeout=20)
    except OSError as exc:
        raise FirewallError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise FirewallError(
            f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[:500]}"
        )
    return done.stdout


@dataclass(frozen=True)
class Family:
    name: str  # "ipv4" | "ipv6"
    save: str
    restore: str
    blocked: tuple[str, ...]
    reject_with: str


IPV4 = Family("ipv4", "iptables-save", "iptables-restore", BLOCKED_V4, "icmp-port-unreachable")
IPV6 = Family("ipv6", "ip6tables-save", "ip6tables-restore", BLOCKED_V6, "icmp6-port-unreachable")


def _canonical(cidr: str) -> str:
    """A network as iptables-save prints it (host routes get /32 or /128 spelled out)."""
    return str(ipaddress.ip_network(cidr, strict=False))


@dataclass(frozen=True)
class Plan:
    """The rules of one family: what ``iptables-save -t filter`` shows when intact."""

    family: Family
    forward_hook: str  # DOCKER-USER, or FORWARD where Docker does not manage this family
    jumps: tuple[tuple[str, str], ...]  # (hook chain, rule text without "-A <chain> ")
    chains: dict[str, tuple[str, ...]]  # our chain -> its rules, in order


class Firewall:
    """Install, verify and remove the egress policy; thread-safe."""

    def __init__(self, config: IsolationConfig, runner: Runner = run_command) -> None:
        self._config = config
        self._run = runner
        self._lock = threading.Lock()
        self.fwd_chain = f"{config.firewall_chain}-FWD"
        self.in_chain = f"{config.firewall_chain}-IN"
        self.interfaces = f"{config.bridge_prefix}+"

    @property
    def enabled(self) -> bool:
        return self._config.egress_policy

    def families(self) -> list[Family]:
        """IPv4 always; IPv6 where ip6tables exists (a host without it has no v6 filter)."""
        return [IPV4] + ([IPV6] if shutil.which(IPV6.save) else [])

    def plan(self, family: Family, table: str) -> Plan:
        # Spelled as iptables-save prints them (-d before -i), so a check is a comparison.
        iface = f"-i {self.interfaces}"
        established = f"{iface} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
        v6 = family is IPV6
        allow = [
            f"-d {_canonical(str(n))} {iface} -j RETURN"
            for n in self._config.egress_allow
            if (n.version == 6) == v6
        ]
        reject = f"-j REJECT --reject-with {family.reject_with}"
        fwd = (
            established,
            *allow,
            *(f"-d {_canonical(c)} {iface} {reject}" for c in family.blocked),
        )
        inp = (established, *allow, f"{iface} {reject}")
        hook = "DOCKER-USER" if ":DOCKER-USER " in table else "FORWARD"
        return Plan(
            family,
            hook,
            ((hook, f"{iface} -j {self.fwd_chain}"), ("INPUT", f"{iface} -j {self.in_chain}")),
            {self.fwd_chain: fwd, self.in_chain: inp},
        )

    # -- reading ------------------------------------------------------------------

    def _table(self, family: Family) -> str:
        return self._run([family.save, "-t", "filter"], None)

    @staticmethod
    def _rules(table: str, chain: str) -> list[str]:
        prefix = f"-A {chain} "
        return [line[len(prefix) :] for line in table.splitlines() if line.startswith(prefix)]

    def problems(self, family: Family, table: str) -> list[str]:
        """What differs from the plan (empty: intact)."""
        plan = self.plan(family, table)
        found = []
        for chain, wanted in plan.chains.items():
            if self._rules(table, chain) != list(wanted):
                found.append(f"{family.name} chain {chain} is missing or altered")
        for hook, rule in plan.jumps:
            count = self._rules(table, hook).count(rule)
            if count != 1:
                found.append(f"{family.name} {hook} has {count} jumps to our chain, not 1")
        return found

    # -- writing ------------------------------------------------------------------

    def ensure(self) -> bool:
        """Install or repair the rules (no-op when intact); True when something changed.

        With the policy off, rules left by an earlier run are removed instead.
        Raises ``FirewallError`` when a family cannot be read or written.
        """
        if not self.enabled:
            return self.uninstall()
        changed = False
        with self._lock:
            for family in self.families():
                table = self._table(family)
                problems = self.problems(family, table)
                if not problems:
                    continue
                log.warning(
                    "egress policy rules missing or altered; restoring them",
                    extra={"family": family.name, "problems": problems},
                )
                self._write(family, table)
                changed = True
        return changed

    def _write(self, family: Family, table: str) -> None:
        plan = self.plan(family, table)
        lines = ["*filter"]
        for chain in plan.chains:
            if f":{chain} " not in table:
                lines.append(f":{chain} - [0:0]")
        for chain, rules in plan.chains.items():
            lines.append(f"-F {chain}")
            lines.extend(f"-A {chain} {rule}" for rule in rules)
        for hook, rule in plan.jumps:
            present = self._rules(table, hook).count(rule)
            # Duplicates (two agents' races, a manual insert) go; one stays, first.
            lines.extend(f"-D {hook} {rule}" for _ in range(present))
            lines.append(f"-I {hook} 1 {rule}")
        lines.append("COMMIT")
        self._run([family.restore, "--noflush"], "\n".join(lines) + "\n")

    def uninstall(self) -> bool:
        """Remove the jumps and the agent's chains; True when anything was there."""
        removed = False
        with self._lock:
            for family in self.families():
                if shutil.which(family.save) is None:
                    continue  # no iptables here: no rules of ours can exist to remove
                table = self._table(family)
                lines = ["*filter"]
                for hook in ("DOCKER-USER", "FORWARD", "INPUT"):
                    for chain in (self.fwd_chain, self.in_chain):
                        rule = f"-i {self.interfaces} -j {chain}"
                        lines.extend(
                            f"-D {hook} {rule}" for _ in range(self._rules(table, hook).count(rule))
                        )
                for chain in (self.fwd_chain, self.in_chain):
                    if f":{chain} " in table:
                        lines.extend((f"-F {chain}", f"-X {chain}"))
                if len(lines) == 1:
                    continue
                lines.append("COMMIT")
                self._run([family.restore, "--noflush"], "\n".join(lines) + "\n")
                removed = True
        if removed:
            log.info("egress policy rules removed", extra={"chain": self._config.firewall_chain})
        return removed

    def status(self) -> list[str]:
        """Problems across families; empty when the policy is in place (or off and absent)."""
        found: list[str] = []
        for family in self.families():
            table = self._table(family)
            if self.enabled:
                found.extend(self.problems(family, table))
            elif any(f":{c} " in table for c in (self.fwd_chain, self.in_chain)):
                found.append(f"{family.name}: policy is off but the agent's chains remain")
        return found

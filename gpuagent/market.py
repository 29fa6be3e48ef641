"""The market's rules both sides enforce (one home each): locations, prices, label
selectors, and the bounds of the bandwidth probe (docs/market.md).

The agent checks its ``node.location`` and ``node.pricing`` with these at config load;
the coordinator checks a buyer's constraints at submit and a node's offer on receipt
with the same functions, so an error reads the same wherever it is caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .countries import COUNTRIES
from .leaserules import MAX_PRICE_MICROS

# Free-form region and zone names: short, printable, no spaces (they are filter keys).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# Label keys as Kubernetes spells them (optional DNS prefix, then a name); values short.
LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
MAX_SELECTOR_LABELS = 32
MAX_COUNTRIES = 64
MAX_BANDWIDTH_BPS = 10**13  # 10 Tbit/s: past any NIC, below int64

# The bandwidth probe (Market.BandwidthProbe): what one probe may move and for how long.
PROBE_DEFAULT_BYTES = 8 * 1024 * 1024
PROBE_MAX_BYTES = 64 * 1024 * 1024
PROBE_CHUNK_BYTES = 256 * 1024
PROBE_MAX_SECONDS = 10.0
PROBE_CLOCK_SKEW_NS = 60 * 10**9  # a signed request is valid this long either side
# The default probe interval (agent config node.bandwidth_probe_interval).
PROBE_INTERVAL_SECONDS = 3600.0

# The key under which node.pricing sets the ask of every GPU no other key names.
ANY_MODEL = "*"
# The Hello label old agents carry their one price in (before NodeOffer.pricing).
LEGACY_PRICE_LABEL = "price_micros_per_gpu_hour"


class MarketError(ValueError):
    """A bad location, price, selector or constraint; the message names the key."""


def check_country(code: str, where: str) -> str:
    """``code`` upper-cased when it is an ISO 3166-1 alpha-2 code, else MarketError."""
    upper = code.strip().upper()
    if upper not in COUNTRIES:
        raise MarketError(
            f"{where}: {code[:16]!r} is not an ISO 3166-1 alpha-2 country code (e.g. DE, US, JP)"
        )
    return upper


def check_name(value: str, where: str) -> str:
    if value and not NAME_RE.match(value):
        raise MarketError(
            f"{where}: {value[:70]!r} must be 1-64 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def check_price(value: int, where: str) -> int:
    if not 0 <= value <= MAX_PRICE_MICROS:
        raise MarketError(f"{where}: must be 0..{MAX_PRICE_MICROS} micro-units, got {value}")
    return value


def check_bandwidth(value: int | float, where: str) -> int:
    if not 0 <= value <= MAX_BANDWIDTH_BPS:
        raise MarketError(f"{where}: must be 0..{MAX_BANDWIDTH_BPS} bits/s, got {value}")
    return int(value)


def check_selector(selector: Mapping[str, str], where: str) -> dict[str, str]:
    if len(selector) > MAX_SELECTOR_LABELS:
        raise MarketError(f"{where}: at most {MAX_SELECTOR_LABELS} labels, got {len(selector)}")
    for key, value in selector.items():
        if not LABEL_KEY_RE.match(key):
            raise MarketError(
                f"{where}[{key[:70]!r}]: not a label key (letters, digits, '-', '_', '.', "
                "optionally prefixed 'domain/'; at most 63 characters for the name)"
            )
        if not LABEL_VALUE_RE.match(value):
            raise MarketError(
                f"{where}[{key[:70]!r}]: value {value[:70]!r} is not a label value "
                "(at most 63 letters, digits, '-', '_' or '.')"
            )
    return dict(selector)


def check_countries(codes: Iterable[str], where: str) -> list[str]:
    codes = list(codes)
    if len(codes) > MAX_COUNTRIES:
        raise MarketError(f"{where}: at most {MAX_COUNTRIES} countries, got {len(codes)}")
    return [check_country(c, f"{where}[{i}]") for i, c in enumerate(codes)]


def check_ratio(value: float, where: str) -> float:
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise MarketError(f"{where}: must be a ratio 0..1 (0.99 = 99 %), got {value}")
    return value


def resolve_pricing(pricing: Mapping[str, int], gpu_models: Iterable[str]) -> dict[str, int]:
    """The ask for each distinct GPU model from ``node.pricing``'s keys.

    A key matches a model when it is a case-insensitive substring of the GPU's name
    (as ``gpu_model`` in a lease); the longest matching key wins, ``*`` is the ask of
    every model no other key matches. A model no key matches has no ask here (the
    coordinator's default applies).
    """
    keys = sorted((k for k in pricing if k != ANY_MODEL), key=len, reverse=True)
    out: dict[str, int] = {}
    for model in dict.fromkeys(gpu_models):
        folded = model.casefold()
        key = next((k for k in keys if k.casefold() in folded), None)
        if key is not None:
            out[model] = pricing[key]
        elif ANY_MODEL in pricing:
            out[model] = pricing[ANY_MODEL]
    return out


def unmatched_price_keys(pricing: Mapping[str, int], gpu_models: Iterable[str]) -> list[str]:
    """Keys of ``node.pricing`` that name no GPU of the node (a typo prices nothing)."""
    models = [m.casefold() for m in gpu_models]
    return [k for k in pricing if k != ANY_MODEL and not any(k.casefold() in m for m in models)]


def legacy_price(labels: Mapping[str, str], label: str = LEGACY_PRICE_LABEL) -> int | None:
    """An old agent's single ask from its Hello label, or None when absent or malformed."""
    raw = labels.get(label)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or int(text) > MAX_PRICE_MICROS:
        return None
    return int(text)


_BANDWIDTH_RE = re.compile(
    r"^\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([kMGT]?)(?:bit/s|bps|b/s)?\s*$", re.IGNORECASE
)
_BANDWIDTH_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bandwidth(value: object, where: str) -> int:
    """Bits per second from 1000000000, "1Gbit/s", "500 Mbps", "2.5G"; MarketError else."""
    if isinstance(value, bool):
        raise MarketError(f"{where}: expected a bandwidth such as 1Gbit/s, got {value!r}")
    if isinstance(value, int | float):
        return check_bandwidth(value, where)
    match = _BANDWIDTH_RE.match(str(value))
    if match is None:
        raise MarketError(
            f"{where}: {str(value)[:40]!r} is not a bandwidth (e.g. 1Gbit/s, 500Mbps, 10G)"
        )
    number = float(match[1]) * _BANDWIDTH_SCALE[match[2].lower()]
    return check_bandwidth(number, where)


def format_bps(bps: int) -> str:
    """1.2 Gbit/s, 850 Mbit/s; "-" for 0 (never measured)."""
    if bps <= 0:
        return "-"
    for unit, scale in (("Tbit/s", 10**12), ("Gbit/s", 10**9), ("Mbit/s", 10**6)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps / 1e3:.3g} kbit/s"

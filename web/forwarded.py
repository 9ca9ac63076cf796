"""Who the client is behind a reverse proxy: `X-Forwarded-For` and `X-Forwarded-Proto`, honoured only from the
proxies listed in `SG_TRUSTED_PROXIES`.

A request whose TCP peer is not a listed proxy is taken as it is: its headers are the client's own words and are
ignored. From a listed proxy, `X-Forwarded-For` is read from the right (each proxy appends the address it saw) and
the client is the first address that is not a listed proxy itself, or the leftmost one when every hop is listed
(what nginx's `real_ip_recursive on` and uvicorn's `--forwarded-allow-ips` do). Entries left of that are whatever
the client sent and are never read. `X-Forwarded-Proto` is taken from its rightmost value (the one the nearest proxy,
which we trust, wrote or passed on).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """`10.0.0.1`, `10.0.0.0/8`, `::1`, `fd00::/8` → networks; ValueError naming the bad entry."""
    out: list[Network] = []
    for entry in (e.strip() for e in entries):
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.1 or 10.0.0.0/8)") from None
    return tuple(out)


def _address(text: str) -> Address | None:
    """An address as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]`, `1.2.3.4:5678`, `[::1]:80`."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Forwarded:
    client: str
    """The client's address: the TCP peer, or what the trusted proxies say it was."""
    scheme: str | None
    """`http`/`https` as the trusted proxy says the client connected; None: not said (or not trusted)."""


def resolve(
    peer: str | None, forwarded_for: Sequence[str], forwarded_proto: Sequence[str], trusted: Sequence[Network]
) -> Forwarded:
    """The client behind `peer` given the request's `X-Forwarded-For`/`-Proto` header values (each may hold a
    comma-separated list, and a header may come more than once: they are read as one list, in order)."""
    peer_addr = _address(peer) if peer else None
    if peer_addr is None or not _listed(peer_addr, trusted):
        return Forwarded(client=peer or "?", scheme=None)
    client: Address = peer_addr
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        addr = _address(hop)
        if addr is None:
            break  # written by a listed proxy, but not an address: keep the last hop we could read
        client = addr
        if not _listed(addr, trusted):
            break
    protos = [p.strip().lower() for value in forwarded_proto for p in value.split(",") if p.strip()]
    scheme = protos[-1] if protos and protos[-1] in ("http", "https") else None
    return Forwarded(client=str(client), scheme=scheme)


def _listed(addr: Address, trusted: Sequence[Network]) -> bool:
    return any(addr in net for net in trusted)

"""Where http.request may go: public addresses only, unless the server allows a network.

The host is resolved here and every address it resolves to is checked (anything not
globally routable — loopback, private, carrier-grade NAT, link-local, which covers cloud
metadata endpoints, reserved, unspecified — and multicast are refused, also when embedded in
an IPv6 address: IPv4-mapped, NAT64, 6to4, Teredo); the request then goes to the checked
address, so a second DNS answer cannot swap it (DNS rebinding). Each redirect is checked
the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from orchestrator.server.tools.registry import ToolError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(spec: str) -> tuple[Network, ...]:
    """CIDRs from a comma-separated list ("127.0.0.1/32, 10.0.0.0/8")."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()
    )


# NAT64's well-known prefix (RFC 6052): 64:ff9b::a9fe:a9fe reaches 169.254.169.254.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: IPv4-mapped (::ffff:a.b.c.d), NAT64,
    6to4 (2002::/16) and Teredo (server and client)."""
    out = []
    if address.ipv4_mapped is not None:
        out.append(address.ipv4_mapped)
    if address in NAT64:
        out.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:
        out.append(address.sixtofour)
    if address.teredo is not None:
        out.extend(address.teredo)
    return out


def _forbidden(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _forbidden(address.ipv4_mapped)
        if any(_forbidden(inner) for inner in _embedded(address)):
            return True
    # Not is_global: that also covers carrier-grade NAT (100.64.0.0/10, where one cloud
    # serves its metadata), benchmarking, documentation and reserved ranges.
    return not address.is_global or address.is_multicast


def _allowed(address: Address, allow: Sequence[Network]) -> bool:
    """Allowed when the address, or every IPv4 address it embeds, is in an allowed network."""
    if any(address in network for network in allow):
        return True
    inner = _embedded(address) if isinstance(address, ipaddress.IPv6Address) else []
    return bool(inner) and all(any(v4 in network for network in allow) for v4 in inner)


async def resolve_allowed(host: str, port: int, allow: Sequence[Network]) -> str:
    """An address of `host` that http.request may connect to; ToolError if any is forbidden."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host!r}: {exc}", reason="DNS_ERROR") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if _forbidden(address) and not _allowed(address, allow):
            raise ToolError(
                f"{host!r} resolves to {address}, which http.request may not reach "
                "(loopback, private, link-local or metadata address)",
                retryable=False,
                reason="DESTINATION_NOT_ALLOWED",
            )
    return str(addresses[0])

"""Where http.request may go: public addresses only, unless the server allows a network.

The host is resolved here and every address it resolves to is checked (loopback, private,
link-local — which covers cloud metadata endpoints — multicast, reserved and unspecified are
refused); the request then goes to the checked address, so a second DNS answer cannot swap it
(DNS rebinding). Each redirect is checked the same way.
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


def _forbidden(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def resolve_allowed(host: str, port: int, allow: Sequence[Network]) -> str:
    """An address of `host` that http.request may connect to; ToolError if any is forbidden."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ToolError(f"cannot resolve {host!r}: {exc}", reason="DNS_ERROR") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if _forbidden(address) and not any(address in network for network in allow):
            raise ToolError(
                f"{host!r} resolves to {address}, which http.request may not reach "
                "(loopback, private, link-local or metadata address)",
                retryable=False,
                reason="DESTINATION_NOT_ALLOWED",
            )
    return str(addresses[0])

"""Relay authorisation of clients that have not authenticated.

A client that authenticated (AUTH, on a listener with ``auth``) may relay;
what it may send is ``mta.policy.account``'s to decide.  For any other
client the only grant is an address inside the listener's
``trusted_networks``.  Failure: ``Rejected`` with ``554 5.7.1`` at RCPT for
everyone else: this MTA never relays for strangers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from mta import replies

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """From a socket peer tuple or an address string."""
    if isinstance(peer, tuple):
        peer = peer[0] if peer else None
    if not isinstance(peer, str):
        return None
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(peer: object, networks: Sequence[Network]) -> bool:
    ip = client_ip(peer)
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


def check_relay(peer: object, networks: Sequence[Network]) -> None:
    if not is_trusted(peer, networks):
        raise replies.Rejected(replies.RELAY_DENIED, f"client {peer!r} not in trusted_networks")

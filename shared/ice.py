"""Choosing which local addresses ICE may use.

aioice gathers host candidates from every interface except 127.0.0.1, so a call
between two processes on one machine would otherwise run over the machine's
external interface. aioice has no option for this, so :func:`restrict_host_addresses`
replaces its address lookup (``aioice.ice.get_host_addresses``) for this process with
one that returns only the addresses given. Every local call (demo, tests) restricts
to 127.0.0.1; a call between namespaces restricts to each host's own veth address.

A restriction must only ever name *this* host's addresses: aioice binds a socket to each one,
so the receiver derives it from its listen address (:func:`addresses_for_host`) and the
sender, which knows only the receiver's address, restricts just for a loopback receiver
(:func:`addresses_for_receiver`) and otherwise gathers from every interface.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

import aioice.ice

log = logging.getLogger(__name__)

_original: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def restrict_host_addresses(addresses: list[str] | None) -> None:
    """Limit ICE host candidates to ``addresses`` (None restores aioice's default)."""
    if not addresses:
        aioice.ice.get_host_addresses = _original
        return
    checked = [str(ipaddress.ip_address(a)) for a in addresses]  # ValueError on garbage

    def only_these(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in checked
                if (use_ipv4 and ipaddress.ip_address(a).version == 4)
                or (use_ipv6 and ipaddress.ip_address(a).version == 6)]

    aioice.ice.get_host_addresses = only_these
    log.info("ICE host candidates restricted to %s", checked)


def addresses_for_host(host: str) -> list[str] | None:
    """The ICE restriction that fits a listen/connect host: a loopback or specific IP
    restricts to that IP; a name or 0.0.0.0 leaves aioice's default."""
    if host in ("localhost",):
        return ["127.0.0.1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    if ip.is_loopback:
        return ["127.0.0.1"] if ip.version == 4 else None
    return [str(ip)]


def addresses_for_receiver(host: str) -> list[str] | None:
    """The sender's default ICE restriction for a receiver at ``host``: 127.0.0.1 when the
    receiver is on this machine's loopback, else None (every local interface; the receiver's
    address is not one of ours, and binding to it fails)."""
    if host == "localhost":
        return ["127.0.0.1"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ["127.0.0.1"] if ip.is_loopback and ip.version == 4 else None

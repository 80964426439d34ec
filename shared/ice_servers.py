"""STUN and TURN servers for calls between machines that cannot reach each other directly.

Both ends take ``--ice-server URL`` (repeatable) and hand the result of :func:`rtc_configuration`
to ``RTCPeerConnection``. URLs are the WebRTC ones (RFC 7064/7065)::

    stun:stun.example.org[:3478]
    turn:turn.example.org[:3478][?transport=udp|tcp]      credentials from --ice-username/--ice-credential
    turn:USER:PASSWORD@turn.example.org:3478              credentials in the URL (this project's shorthand)
    turns:turn.example.org:5349                           TURN over TLS (transport tcp)

``--ice-relay-only`` sets ``iceTransportPolicy=relay``: only relayed candidates are offered, so
the call goes through TURN even where a direct path exists (hides the host's addresses; tests).

Everything is checked when the options are parsed, so a typo is a clear error before any call
is made, never a hang: aiortc would otherwise skip a server it cannot use without a word. aiortc
uses only the first STUN and the first TURN server it is given; later ones of the same kind are
refused here rather than silently ignored.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.rtcicetransport import parse_stun_turn_uri

log = logging.getLogger(__name__)


class IceServerError(ValueError):
    """An --ice-server option that cannot be used; the message says why."""


@dataclass
class IceServerOptions:
    urls: list[str] | None = None  # --ice-server, in order
    username: str | None = None  # --ice-username: for turn(s) URLs without credentials of their own
    credential: str | None = None  # --ice-credential
    relay_only: bool = False  # --ice-relay-only: iceTransportPolicy "relay"


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``turn:user:pass@host`` -> (``turn:host``, user, pass); other URLs unchanged."""
    scheme, sep, rest = url.partition(":")
    if not sep or "@" not in rest:
        return url, None, None
    userinfo, _, hostpart = rest.rpartition("@")  # rpartition: a password may contain "@"
    user, colon, password = userinfo.partition(":")
    if not colon or not user:
        raise IceServerError(f"--ice-server {_redact(url)}: credentials in a URL are written USER:PASSWORD@HOST")
    return f"{scheme}:{hostpart}", user, password


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition(":")
    return f"{scheme}:***@{rest.rpartition('@')[2]}" if sep and "@" in rest else url


def ice_servers(options: IceServerOptions) -> list[RTCIceServer]:
    """The servers to give aiortc, checked: raises :class:`IceServerError` with a readable reason."""
    servers: list[RTCIceServer] = []
    kinds: set[str] = set()
    for raw in options.urls or []:
        url, user, password = _split_credentials(raw.strip())
        try:
            parsed = parse_stun_turn_uri(url)
        except ValueError as e:
            raise IceServerError(f"--ice-server {_redact(raw)}: {e} (expected stun:HOST[:PORT] or "
                                 "turn:HOST[:PORT][?transport=udp|tcp])") from e
        scheme = parsed["scheme"]
        kind = "stun" if scheme.startswith("stun") else "turn"
        if scheme == "stuns":
            raise IceServerError(f"--ice-server {raw}: aiortc cannot use stuns: (use stun:)")
        if kind == "turn":
            user = user if user is not None else options.username
            password = password if password is not None else options.credential
            if not user or password is None:
                raise IceServerError(f"--ice-server {_redact(raw)}: a TURN server needs a username and a credential "
                                     "(--ice-username/--ice-credential, or turn:USER:PASSWORD@HOST)")
            if parsed["transport"] not in ("udp", "tcp") or (scheme == "turns" and parsed["transport"] != "tcp"):
                # aiortc would skip such a server without a word
                raise IceServerError(f"--ice-server {_redact(raw)}: transport must be udp or tcp (tcp for turns:)")
        if kind in kinds:
            raise IceServerError(f"--ice-server {_redact(raw)}: aiortc uses only one {kind.upper()} server; "
                                 "give at most one stun: and one turn(s): URL")
        kinds.add(kind)
        servers.append(RTCIceServer(urls=url, username=user if kind == "turn" else None,
                                    credential=password if kind == "turn" else None))
    if options.relay_only and "turn" not in kinds:
        raise IceServerError("--ice-relay-only needs a TURN server (--ice-server turn:...)")
    return servers


def rtc_configuration(options: IceServerOptions | None = None) -> RTCConfiguration:
    """The RTCPeerConnection configuration for these options (None: no servers, host candidates only)."""
    options = options or IceServerOptions()
    servers = ice_servers(options)
    if servers:
        log.info("ICE servers: %s%s", ", ".join(_redact(s.urls) for s in servers),
                 " (relay only)" if options.relay_only else "")
    policy = RTCIceTransportPolicy.RELAY if options.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def check_relay(sdp: str, configuration: RTCConfiguration, side: str) -> None:
    """After gathering: a TURN server that gave no relay candidate is an error when the call may
    only be relayed (raises :class:`IceServerError`), else a warning.

    aioice drops a failed allocation without a word (a wrong password fails at once, an unreachable
    server after ~5 s); without this check a relay-only call would wait for the ICE timeout and say
    nothing about why.
    """
    turn = [s.urls for s in configuration.iceServers or [] if str(s.urls).startswith("turn")]
    if not turn or " typ relay" in sdp:
        return
    why = (f"{side}'s TURN server {_redact(str(turn[0]))} gave no relay address (wrong --ice-username/"
           "--ice-credential, or the server cannot be reached over UDP/TCP)")
    if configuration.iceTransportPolicy == RTCIceTransportPolicy.RELAY:
        raise IceServerError(why)
    log.warning("%s: calling without a relay", why)


def add_ice_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ice-server options, identical on sender and receiver."""
    parser.add_argument("--ice-server", action="append", dest="ice_server", metavar="URL",
                        help="STUN/TURN server (repeatable; one of each kind): stun:HOST[:PORT], "
                             "turn:HOST[:PORT][?transport=udp|tcp] or turn:USER:PASSWORD@HOST[:PORT]")
    parser.add_argument("--ice-username", help="username for turn: servers given without one")
    parser.add_argument("--ice-credential", help="password for turn: servers given without one")
    parser.add_argument("--ice-relay-only", action="store_true",
                        help="offer only TURN-relayed candidates (the call always goes through the relay)")


def options_from_args(args: argparse.Namespace) -> IceServerOptions:
    """IceServerOptions from parsed arguments, checked (IceServerError on a bad one)."""
    opts = IceServerOptions(args.ice_server, args.ice_username, args.ice_credential, args.ice_relay_only)
    ice_servers(opts)
    return opts

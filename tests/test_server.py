"""The receiver's HTTP server in this process (tiny model), against raw HTTP and a hostile aiortc peer.

Call slots held by slow and unusable offers, offers that never connect, peers that never say Hello,
deep JSON, messages over the size we advertise, the bounded /stats history, CORS. Real sockets, a real
aiortc association on loopback; deadlines are configured short, and every wait is for an outcome with a
generous timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import aiohttp
import pytest
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from bench.attacks import Target, dead_offers, offer_sdp, without_lines
from bench.fuzz import tiny_detector_id, tiny_model
from receiver.server import ReceiverServer, ServerConfig
from receiver.session import SessionConfig
from sender.peer import SenderPeer
from shared import protocol as P
from shared.ice import restrict_host_addresses
from shared.signaling import send_offer
from tests.harness import free_port, until

pytestmark = pytest.mark.call  # a receiver HTTP server and aiortc peers on loopback

ORIGIN = "http://app.example"


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., object]]:
    restrict_host_addresses(["127.0.0.1"])
    servers: list[ReceiverServer] = []

    async def make(**kw) -> ReceiverServer:
        session = kw.pop("session", SessionConfig(sink="null", playout="immediate"))
        cfg = ServerConfig(host="127.0.0.1", port=free_port(), session=session, fast_render=False, **kw)
        server = ReceiverServer(tiny_model(), cfg)
        await server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        await s.stop()
    restrict_host_addresses(None)


def _url(server: ReceiverServer, path: str = "/offer") -> str:
    return f"http://127.0.0.1:{server.config.port}{path}"


async def _post(server: ReceiverServer, body: object, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(_url(server), data=data, headers=headers or {}) as r:
        return r.status, dict(r.headers)


async def test_offers_whose_body_is_still_arriving_hold_a_slot_until_their_read_timeout(make_server) -> None:
    server = await make_server(max_calls=2, offer_read_timeout_s=2.0)
    conns = []
    for _ in range(4):  # each promises 4000 bytes of body and sends 12
        r, w = await asyncio.open_connection("127.0.0.1", server.config.port)
        w.write(b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4000\r\n\r\n{\"sdp\": \"v=0")
        await w.drain()
        conns.append((r, w))

    async def status(r: asyncio.StreamReader) -> int:
        return int((await r.readline()).split()[1])

    statuses = await asyncio.wait_for(asyncio.gather(*(status(r) for r, _ in conns)), 20)
    # two took the two slots and were cut off when their body did not come; two were refused at once
    assert sorted(statuses) == [408, 408, 503, 503]
    for _, w in conns:
        w.close()
    assert server.offers_pending == 0 and not server.sessions
    assert (await _post(server, {"sdp": "v=0", "type": "offer"}))[0] == 400  # the slots are free again


async def test_unusable_offers_get_400_free_their_slot_and_are_not_calls(make_server) -> None:
    server = await make_server(max_calls=1, stop_after_calls=1)
    sdp = await offer_sdp()
    audio = sdp.replace("m=application", "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\nm=application")
    for bad in (without_lines(sdp, "m="), without_lines(sdp, "a=candidate"), without_lines(sdp, "a=fingerprint"),
                without_lines(sdp, "a=ice-ufrag"), audio):
        status, _ = await _post(server, {"sdp": bad, "type": "offer"})
        assert status == 400
        assert not server.sessions and server.offers_pending == 0
    # none of them was a call: nothing finished, --stop-after-calls 1 still waiting
    assert server.calls_finished == 0 and not server.finished and not server.done.is_set()
    async with aiohttp.ClientSession() as http, http.get(_url(server, "/stats")) as r:
        assert (await r.json())["finished"] == []
    # the one slot is free: a usable offer is answered
    assert (await _post(server, {"sdp": sdp, "type": "offer"}))[0] == 200
    assert len(server.sessions) == 1


async def _connect(server: ReceiverServer) -> tuple[RTCPeerConnection, RTCDataChannel]:
    """A peer that is not kpcast's sender: one 'control' channel, nothing sent by itself."""
    pc = RTCPeerConnection()
    ch = pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    answer = await send_offer(_url(server), pc.localDescription)
    await pc.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    opened = asyncio.Event()
    ch.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), 20)
    return pc, ch


async def test_a_peer_that_sends_only_junk_is_dropped_for_want_of_a_hello(make_server) -> None:
    server = await make_server(max_calls=1, session=SessionConfig(sink="null", playout="immediate",
                                                                  hello_timeout_s=0.5, setup_timeout_s=60))
    pc, ch = await _connect(server)
    try:
        async def junk() -> None:
            while True:  # junk used to count as a sign of life
                ch.send(b"\x93\x01\x04junk")
                await asyncio.sleep(0.05)
        task = asyncio.ensure_future(junk())
        await until(lambda: not server.sessions, "the junk peer to be dropped")
        task.cancel()
    finally:
        await pc.close()
    assert server.finished[-1]["end_reason"] == "no hello"
    assert sum(server.finished[-1]["rejected_by_reason"].values()) > 0  # the junk, counted
    pc2, _ = await _connect(server)  # its slot is free for the next caller
    await pc2.close()


async def test_with_every_slot_taken_a_peer_without_hello_gives_way_to_a_caller(make_server) -> None:
    server = await make_server(max_calls=1, evict_after_s=0.3,
                               session=SessionConfig(sink="null", playout="immediate", setup_timeout_s=60))
    silent, _ = await _connect(server)
    caller = None
    try:
        await asyncio.sleep(0.4)  # silent for longer than evict_after_s
        assert (await _post(server, {"sdp": "v=0", "type": "offer"}))[0] == 400  # an unusable offer evicts nobody
        assert len(server.sessions) == 1 and not server.finished
        caller, ch = await _connect(server)  # a usable one takes the silent peer's slot
        assert server.finished[-1]["end_reason"].startswith("evicted")
        assert len(server.sessions) == 1 and server.offers_pending == 0
        ch.send(P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
        await until(lambda: all(s.hello is not None for s in server.sessions.values()), "the caller's Hello")
        await asyncio.sleep(0.4)
        # a caller that said Hello is never evicted: the next offer is refused before it is read
        assert (await _post(server, {"sdp": "v=0", "type": "offer"}))[0] == 503
        assert len(server.sessions) == 1 and len(server.finished) == 1
    finally:
        await silent.close()
        if caller is not None:
            await caller.close()


async def _post_json(server: ReceiverServer, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(_url(server), json=body) as r:
        return r.status, await r.json()


async def test_an_answered_offer_that_never_connects_gives_way_sooner_than_a_connected_peer(make_server) -> None:
    server = await make_server(max_calls=1, evict_after_s=30.0, evict_unconnected_after_s=0.5,
                               session=SessionConfig(sink="null", playout="immediate", setup_timeout_s=60))
    # a connected peer that has not said Hello keeps its slot for evict_after_s (lossy-link callers)
    silent, _ = await _connect(server)
    await asyncio.sleep(0.7)
    status, body = await _post_json(server, {"sdp": await offer_sdp(), "type": "offer"})
    assert status == 503 and 28 < body["retry_after_s"] <= 30  # when it would give way
    assert len(server.sessions) == 1 and not server.finished
    await silent.close()
    await until(lambda: not server.sessions, "the silent peer's hang-up")
    # an answered offer whose peer is gone (its pc closed): ICE never connects
    assert (await _post(server, {"sdp": await offer_sdp(), "type": "offer"}))[0] == 200
    status, body = await _post_json(server, {"sdp": await offer_sdp(), "type": "offer"})
    assert status == 503 and 0 < body["retry_after_s"] < 0.5 * 4 / 3  # its own delay: 0.5 s to 4/3 of it
    await asyncio.sleep(0.8)
    assert (await _post(server, {"sdp": "v=0", "type": "offer"}))[0] == 400  # an unusable offer still evicts nobody
    caller, ch = await _connect(server)  # a usable one takes the slot
    try:
        assert server.finished[-1]["end_reason"] == "evicted: not connected, and a new offer needed the slot"
        ch.send(P.encode(P.Hello(tiny_detector_id(), 64, 30.0)))
        await until(lambda: all(s.hello is not None for s in server.sessions.values()), "the caller's Hello")
        status, body = await _post_json(server, {"sdp": await offer_sdp(), "type": "offer"})
        assert status == 503 and "retry_after_s" not in body  # a caller never gives way: nothing to wait for
    finally:
        await caller.close()


async def test_a_flood_of_offers_that_never_connect_does_not_lock_a_caller_out(make_server) -> None:
    """What an outside probe did: a peer with the token posts 4 answered-but-dead offers a second. The
    sender (SenderPeer.connect) is refused at first, offers again when a slot gives way, and gets in."""
    server = await make_server(max_calls=2)  # the default eviction delays
    dead = [await offer_sdp() for _ in range(4)]  # real offers whose peer connections are already closed
    statuses: Counter = Counter()

    async def flood() -> None:
        for i in itertools.count():
            statuses[(await _post(server, {"sdp": dead[i % len(dead)], "type": "offer"}))[0]] += 1
            await asyncio.sleep(0.25)

    task = asyncio.ensure_future(flood())
    peer = SenderPeer()
    try:
        await until(lambda: len(server.sessions) == 2, "the flood to take every slot")
        await asyncio.sleep(1.0)
        await peer.connect(_url(server), timeout_s=15.0)  # 503s first: it offers again
        peer.send_control(P.Hello(tiny_detector_id(), 64, 30.0))
        await until(lambda: any(s.hello is not None for s in server.sessions.values()), "the caller's Hello")
        caller = next(s for s in server.sessions.values() if s.hello is not None)
        assert statuses[503] > 0  # it did have to wait for a slot
        await asyncio.sleep(1.5)  # the flood goes on: a caller is never evicted
        assert caller.call_id in server.sessions and not caller.closed.is_set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await peer.close()
    evicted = [f["end_reason"] for f in server.finished if f["end_reason"].startswith("evicted")]
    assert evicted and all(r.startswith("evicted: not connected") for r in evicted)


async def test_the_hostile_benchs_dead_offers_attack_lets_its_caller_in(make_server) -> None:
    server = await make_server(max_calls=2)
    out = await dead_offers(Target("127.0.0.1", server.config.port, tiny_detector_id(), 2), hold_s=1.0)
    try:
        assert out.held, out.note
        assert out.statuses[200] >= 2 and out.statuses[503] > 0, out.statuses
    finally:
        await out.cleanup()


async def test_json_nested_20000_deep_is_a_400_and_the_receiver_stays_healthy(make_server) -> None:
    server = await make_server(max_calls=1)
    deep = b'{"sdp": ' + b"[" * 20_000 + b"]" * 20_000 + b', "type": "offer"}'
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(server), data=deep) as r:
            assert r.status == 400 and "nested too deeply" in (await r.json())["error"]
        async with http.get(_url(server, "/health")) as r:
            assert r.status == 200 and (await r.json()) == {"ok": True, "calls": 0}
    assert server.offers_pending == 0
    assert (await _post(server, {"sdp": await offer_sdp(), "type": "offer"}))[0] == 200  # the slot is free


async def test_a_message_over_the_advertised_size_ends_the_call(make_server) -> None:
    server = await make_server()
    pc, ch = await _connect(server)
    try:
        pc.sctp._remote_max_message_size = 16 * 1024 * 1024  # this peer ignores what the receiver advertised
        ch.send(b"x" * (8 * 1024 * 1024))
        await until(lambda: not server.sessions, "the call to end")
    finally:
        await pc.close()
    assert server.finished[-1]["end_reason"].startswith("sctp: message")
    assert server.finished[-1]["messages_received"] == 0  # nothing of it reached the session


async def test_stats_keep_a_bounded_history_but_count_every_call(make_server) -> None:
    server = await make_server(max_finished=3)
    for i in range(10):
        server._on_closed(SimpleNamespace(call_id=f"c{i}", index=i, summary=lambda i=i: {"call_id": f"c{i}"}))
    async with aiohttp.ClientSession() as http, http.get(_url(server, "/stats")) as r:
        stats = await r.json()
    assert [f["call_id"] for f in stats["finished"]] == ["c7", "c8", "c9"]
    assert stats["calls_finished"] == server.calls_finished == 10


async def test_cors_for_configured_origins_only(make_server) -> None:
    server = await make_server(cors_origins=[ORIGIN], token="tok")
    async with aiohttp.ClientSession() as http:
        async with http.options(_url(server), headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
        async with http.options(_url(server), headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with http.get(_url(server, "/stats"), headers={"Origin": ORIGIN}) as r:
            assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN  # readable by the page
        async with http.get(_url(server, "/stats?token=tok"), headers={"Origin": ORIGIN}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers = await _post(server, b"{not json", {"Origin": ORIGIN, "Authorization": "Bearer tok"})
    assert status == 400 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers = await _post(server, b"{not json", {"Origin": "http://evil.example",
                                                         "Authorization": "Bearer tok"})
    assert status == 400 and "Access-Control-Allow-Origin" not in headers


async def test_no_cors_headers_without_configured_origins(make_server) -> None:
    server = await make_server()
    status, headers = await _post(server, b"{not json", {"Origin": ORIGIN})
    assert status == 400 and "Access-Control-Allow-Origin" not in headers

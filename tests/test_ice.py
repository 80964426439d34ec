"""ICE host-candidate restriction (aioice leaves 127.0.0.1 out by default)."""

from __future__ import annotations

import aioice.ice
import pytest
from aiortc import RTCPeerConnection

from shared.ice import addresses_for_host, addresses_for_receiver, restrict_host_addresses

pytestmark = pytest.mark.call  # an aiortc peer gathering candidates


@pytest.fixture(autouse=True)
def _restore():
    yield
    restrict_host_addresses(None)


def test_addresses_for_host() -> None:
    assert addresses_for_host("127.0.0.1") == ["127.0.0.1"]
    assert addresses_for_host("localhost") == ["127.0.0.1"]
    assert addresses_for_host("10.77.0.2") == ["10.77.0.2"]
    assert addresses_for_host("0.0.0.0") is None
    assert addresses_for_host("example.org") is None


def test_the_sender_never_restricts_to_the_receivers_address() -> None:
    # aioice binds to every address it is given: the receiver's is not one of the sender's
    assert addresses_for_receiver("127.0.0.1") == ["127.0.0.1"]
    assert addresses_for_receiver("localhost") == ["127.0.0.1"]
    assert addresses_for_receiver("10.77.0.1") is None
    assert addresses_for_receiver("192.168.1.20") is None
    assert addresses_for_receiver("receiver.example.org") is None


def test_restriction_replaces_and_restores_lookup() -> None:
    original = aioice.ice.get_host_addresses
    restrict_host_addresses(["127.0.0.1"])
    assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(False, True) == []
    restrict_host_addresses(None)
    assert aioice.ice.get_host_addresses is original
    with pytest.raises(ValueError):
        restrict_host_addresses(["not an ip"])


async def test_gathered_candidates_are_only_loopback() -> None:
    restrict_host_addresses(["127.0.0.1"])
    pc = RTCPeerConnection()
    pc.createDataChannel("x")
    await pc.setLocalDescription(await pc.createOffer())
    cands = [line for line in pc.localDescription.sdp.splitlines() if line.startswith("a=candidate")]
    await pc.close()
    assert cands and all(" 127.0.0.1 " in c for c in cands)

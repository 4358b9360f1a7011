"""A closed run's bulk connections (swarm/bulk_seal.py): sealed messages, and the handshake that
agrees on their keys, over real loopback sockets."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiloco.swarm import admission as adm
from p2pdiloco.swarm.bulk import Buffers
from p2pdiloco.swarm.bulk_seal import (HandshakeError, InvalidTag, Opener, Seal, caller_handshake,
                                       owner_handshake)
from p2pdiloco.swarm.trust import Trust

pytestmark = pytest.mark.timeout(120)


def _pair(limit: int = 1 << 24) -> tuple[Seal, callable]:
    """One end's Seal, and a maker of fresh openers for the other end (each at message 0)."""
    key_a, key_b = os.urandom(16), os.urandom(16)
    return Seal(key_a, key_b), lambda: Opener(Seal(key_b, key_a), Buffers(), limit)


def _sealed(seal: Seal, pieces: list) -> bytes:
    out = memoryview(bytearray(Seal.sealed_size(sum(len(p) for p in pieces))))
    return bytes(seal.seal(pieces, out))


def _feed(opener: Opener, wire: bytes, step: int) -> list[bytes]:
    """Hand `wire` to the opener as the event loop does, at most `step` bytes per read."""
    got, at = [], 0
    while at < len(wire):
        buf = opener.get_buffer()
        n = min(len(buf), step, len(wire) - at)
        buf[:n] = wire[at:at + n]
        at += n
        message = opener.updated(n)
        if message is not None:
            got.append(bytes(message))
    return got


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 << 20), min_size=1, max_size=4), step=st.integers(1, 5 << 20),
       split=st.integers(0, 7))
def test_sealed_messages_open_whole_whatever_the_reads(sizes, step, split):
    seal, opener = _pair()
    opener = opener()
    messages = [os.urandom(n) for n in sizes]
    wire = b"".join(_sealed(seal, [m[:split], m[split:]]) for m in messages)  # pieces: as a reply's
    assert _feed(opener, wire, step) == messages


def test_a_sealed_message_hides_its_bytes_and_any_change_or_replay_fails():
    seal, opener = _pair()
    plain = b"the span's values " * 1000
    wire = _sealed(seal, [plain])
    assert plain[:64] not in wire
    for at in (0, 8, len(wire) // 2, len(wire) - 1):  # the length, the first byte, one inside, the tag
        bad = bytearray(wire)
        bad[at] ^= 1
        with pytest.raises((InvalidTag, OverflowError)):
            assert _feed(opener(), bytes(bad) + bytes(1 << 20), 4096) == []
    good = opener()
    assert _feed(good, wire, 4096) == [plain]
    with pytest.raises(InvalidTag):  # the same message again: it was sealed under the previous number
        _feed(good, wire, 4096)


def test_a_message_over_the_limit_is_refused_before_it_is_read():
    seal, opener = _pair(limit=1000)
    opener = opener()
    wire = _sealed(seal, [b"x" * 1001])
    buf = opener.get_buffer()
    buf[:8] = wire[:8]
    with pytest.raises(OverflowError, match="1001 bytes"):
        opener.updated(8)


@pytest.fixture(scope="module")
def closed_run():
    ours = adm.throwaway_run(["owner", "caller"])
    (foreign,) = adm.throwaway_run(["caller"])
    return ours, foreign


def _handshake(owner_adm, caller_adm, owner_mode, caller_mode):
    """Both ends' results (or errors) over a real loopback connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    results = {}

    def owner():
        sock, _ = listener.accept()
        sock.settimeout(5)
        try:
            results["owner"] = owner_handshake(sock, Trust(owner_adm).server_ssl(), owner_mode)
        except Exception as exc:
            results["owner"] = exc
            sock.close()

    t = threading.Thread(target=owner)
    t.start()
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        results["caller"] = caller_handshake(sock, Trust(caller_adm).client_ssl(), caller_mode)
    except Exception as exc:
        results["caller"] = exc
        sock.close()
    t.join(10)
    listener.close()
    return results["owner"], results["caller"]


@pytest.mark.parametrize("owner_mode,caller_mode,sealed", [("aes-gcm", "aes-gcm", True), ("none", "none", False),
                                                           ("none", "aes-gcm", True), ("aes-gcm", "none", True)])
def test_the_handshake_agrees_on_keys_and_on_the_stronger_mode(closed_run, owner_mode, caller_mode, sealed):
    (owner_adm, caller_adm), _ = closed_run
    (o_sock, o_seal, o_peer), (c_sock, c_seal, c_peer) = _handshake(owner_adm, caller_adm, owner_mode, caller_mode)
    try:
        assert (o_peer, c_peer) == ("caller", "owner")
        assert (o_seal is not None, c_seal is not None) == (sealed, sealed)
        # The TCP connection goes on after TLS: a message from each end, sealed or not.
        c_sock.settimeout(5)
        o_sock.settimeout(5)
        for seal, src, dst, opener_seal in ((c_seal, c_sock, o_sock, o_seal), (o_seal, o_sock, c_sock, c_seal)):
            plain = os.urandom(3000)
            src.sendall(_sealed(seal, [plain]) if sealed else plain)
            if sealed:
                opener = Opener(opener_seal, Buffers(), 1 << 20)
                got = None
                while got is None:
                    buf = opener.get_buffer()
                    n = dst.recv_into(buf)
                    assert n
                    got = opener.updated(n)
                assert bytes(got) == plain
            else:
                got = b""
                while len(got) < len(plain):
                    got += dst.recv(len(plain) - len(got))
                assert got == plain
    finally:
        o_sock.close()
        c_sock.close()


def test_the_handshake_fails_for_a_caller_of_another_run(closed_run):
    (owner_adm, _), foreign = closed_run
    owner, caller = _handshake(owner_adm, foreign, "aes-gcm", "aes-gcm")
    assert isinstance(owner, Exception) and isinstance(caller, Exception)
    assert not isinstance(owner, HandshakeError)  # TLS itself refused it


def test_a_silent_caller_is_dropped_at_the_handshake_deadline(closed_run):
    """A connection that never speaks TLS costs the owner one handshake slot for its deadline."""
    from p2pdiloco.swarm.bulk import BulkServer
    (owner_adm, _), _ = closed_run
    refusals = []

    async def main():
        async def handler(body, peer):
            return b""

        server = BulkServer(handler, 1 << 20, 5, ssl=Trust(owner_adm).server_ssl(),
                            refused=lambda who, why: refusals.append(why))
        server.handshakes.timeout_s = 1.0
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()
            while not server.handshakes.busy and time.monotonic() - t0 < 2:
                await asyncio.sleep(0.01)
            assert server.handshakes.busy == 1
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the owner
            waited = time.monotonic() - t0
            writer.close()
            while server.handshakes.busy:
                await asyncio.sleep(0.01)
            return waited
        finally:
            await server.stop()

    import uvloop
    waited = uvloop.run(main())
    assert 0.8 < waited < 3.0
    assert len(refusals) == 1 and "TLS handshake failed" in refusals[0]

"""The bulk port (swarm/bulk.py) over real loopback sockets: its framing, its refusals and limits,
and the fall-back to gRPC when a peer's bulk port cannot be reached. The peers here are data planes
in this process (servers, round books, channels), with no DHT; tests/test_swarm*.py run whole peers."""
from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest
import torch

from p2pdiloco.averaging import InProcessAverager, SyncKey, member_bytes
from p2pdiloco.codecs import get_codec
from p2pdiloco.swarm import bulk
from p2pdiloco.swarm.channels import Channels
from p2pdiloco.swarm.dataplane import Identity, RoundBook, Servicer, allreduce
from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb
from p2pdiloco.swarm.loop import BackgroundLoop
from p2pdiloco.swarm.matchmaking import make_group
from p2pdiloco.swarm.records import PROTOCOL_VERSION
from p2pdiloco.swarm.servers import Servers, address

pytestmark = pytest.mark.timeout(60)
MAX_BYTES = 1 << 20


class Plane:
    """One peer's data plane on a loop of its own."""

    def __init__(self, name: str, reduce_timeout_s: float = 2.0, bulk_port: int = 0, codec: str = "fp32"):
        self.identity, self.timeout, self.codec = Identity("run", "hash", name, codec), reduce_timeout_s, get_codec(codec)
        self.book = RoundBook(self.identity, reduce_timeout_s)
        self.loop = BackgroundLoop(name)
        self.servers = Servers(Servicer(self.book, None), MAX_BYTES, reduce_timeout_s)
        self.port, self.bulk_port = self.loop.call(self.servers.start("127.0.0.1", 0, bulk_port), 10)
        self.channels = self.loop.call(self._channels(), 5)  # channels belong to the loop: made on it

    async def _channels(self):
        return Channels(MAX_BYTES)

    def average(self, declared: dict[str, str], x: torch.Tensor, r: int = 0, weight: float = 1.0):
        group = make_group(SyncKey("fragment", 0, r), declared, self.identity.peer_id, group_size=8)
        return self.loop.submit(allreduce(self.book, self.channels, group, self.codec.encode(x), weight,
                                          self.timeout))

    def close(self):
        if not self.loop.loop.is_running():
            return
        try:
            self.loop.call(self.servers.stop(0), 10)
            self.loop.call(self.channels.close(), 10)
        finally:
            self.loop.stop()


@pytest.fixture
def planes():
    made = []
    yield lambda *a, **k: made.append(Plane(*a, **k)) or made[-1]
    for p in made:
        p.close()


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _recv(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def closed(sock) -> bool:
    """The other end closed the connection without answering (an abort may come as a reset)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def call_raw(port: int, wire: bytes) -> tuple[grpc.StatusCode, bytes]:
    """A bulk call written from the framing's description, not with bulk.py's client."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(wire)
        assert _recv(s, len(bulk.MAGIC)) == bulk.MAGIC  # the owner's echo
        code, n = struct.unpack("<BQ", _recv(s, 9))
        return {c.value[0]: c for c in grpc.StatusCode}[code], _recv(s, n)


def request(caller: pb.Caller, payload: bytes) -> bytes:
    return pb.ReduceRequest(caller=caller, kind="fragment", index=0, round=7, group_id=b"g", weight=1.0,
                            payload=payload).SerializeToString()


def framed(message: bytes) -> bytes:
    return bulk.MAGIC + struct.pack("<Q", len(message)) + message


def test_peers_average_over_their_bulk_ports(planes):
    a, b, c = planes("a"), planes("b"), planes("c")
    declared = {p.identity.peer_id: address("127.0.0.1", p.port, p.bulk_port) for p in (a, b, c)}
    xs = [torch.randn(10_001) for _ in range(3)]
    futures = [p.average(declared, x) for p, x in zip((a, b, c), xs)]
    results = [f.result(30) for f in futures]
    for res in results:
        assert torch.allclose(res.mean, sum(xs) / 3, atol=1e-6)
        assert res.participants == ("a", "b", "c")
    # The calls went over the bulk ports: each caller keeps its connections to the two others ...
    assert all(len(sum(p.channels.bulk.idle.values(), [])) == 2 for p in (a, b, c))
    # ... and read the fp32 means' values straight into place: no buffer took a whole reply.
    assert all(not p.channels.bulk.buffers.kept for p in (a, b, c))
    assert all(p.servers.bulk.buffers.kept for p in (a, b, c))  # while the owners' parts did


@pytest.mark.parametrize("codec", ["fp32", "e3m0"])
def test_an_answered_round_lets_go_of_its_parts_and_reply_and_the_next_reuses_the_memory(planes, codec):
    """Once an owner has answered every member, its round keeps only who took part: the parts'
    receive buffers and the owner's sum go back to be reused by the next average, instead of each
    average reading into fresh memory whose pages the kernel must zero (docs/benchmarks.md,
    "Page faults")."""
    peers = [planes(n, codec=codec) for n in ("a", "b", "c")]
    declared = {p.identity.peer_id: address("127.0.0.1", p.port, p.bulk_port) for p in peers}
    for r in (1, 2, 3):  # round numbers of one size: the requests are too (a buffer fits one size)
        xs = [torch.randn(60_000) for _ in peers]
        results = [f.result(30) for f in [p.average(declared, x, r=r) for p, x in zip(peers, xs)]]
        sim = InProcessAverager(list(declared))
        want = [sim.member(n).submit(SyncKey("fragment", 0, r), get_codec(codec).encode(x), 1.0)
                for n, x in zip(declared, xs)]
        assert all(torch.equal(res.mean, w.result(1).mean) for res, w in zip(results, want))
        for p in peers:
            rnd = p.book.rounds[SyncKey("fragment", 0, r)]  # kept until reduce_timeout_s after the answer
            assert wait_until(lambda: rnd.reply is None) and set(rnd.parts) == {"a", "b", "c"}
            assert all(v is None for v in rnd.parts.values())
    for p in peers:  # three averages, one buffer of each kind: each average reused the one before's
        assert len(p.book.means.kept) == 1 and len(p.servers.bulk.buffers.kept) == 2


@pytest.mark.parametrize("codec", ["fp32", "bf16"])
@pytest.mark.parametrize("weights", [(3.0, 1.0, 2.0), (0.0, 0.0, 0.0)])
def test_owners_weigh_parts_by_tokens(planes, codec, weights):
    """An owner's mean weighs fp32/bf16 parts by their tokens; no tokens at all is a plain mean."""
    peers = [planes(n, codec=codec) for n in ("a", "b", "c")]
    declared = {p.identity.peer_id: address("127.0.0.1", p.port, p.bulk_port) for p in peers}
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(20_000, generator=g) for _ in peers]
    results = [f.result(30) for f in [p.average(declared, x, weight=w) for p, x, w in zip(peers, xs, weights)]]
    cast = [get_codec(codec).encode(x).decode() for x in xs]
    w = torch.tensor(weights) if sum(weights) else torch.ones(3)
    expected = get_codec(codec).encode(sum(wi * x for wi, x in zip(w, cast)) / w.sum()).decode()
    # bf16: the owner's fp32 sum may round to the neighbouring bf16 value of ours
    rtol, atol = (0.0, 1e-6) if codec == "fp32" else (2.0 ** -7, 1e-6)
    for res in results:
        assert torch.equal(res.mean, results[0].mean) and torch.allclose(res.mean, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bulk_port", [0, -1])
def test_huffman_coded_parts_average_as_in_the_simulator(planes, bulk_port):
    """e3m0-huffman over real sockets (the bulk port, or gRPC): the in-process averager's means bit
    for bit, and the same count of bytes sent (the data plane's pieces against Encoded.nbytes)."""
    names, xs, ws = ("a", "b", "c"), [torch.randn(50_000) for _ in range(3)], [3.0, 1.0, 2.0]
    peers = [planes(n, bulk_port=bulk_port, codec="e3m0-huffman") for n in names]
    declared = {p.identity.peer_id: address("127.0.0.1", p.port, p.bulk_port) for p in peers}
    results = [f.result(30) for f in [p.average(declared, x, weight=w) for p, x, w in zip(peers, xs, ws)]]
    sim = InProcessAverager(list(names))
    codec = get_codec("e3m0-huffman")
    expected = [sim.member(n).submit(SyncKey("fragment", 0, 0), codec.encode(x), w) for n, x, w in zip(names, xs, ws)]
    for i, (res, want) in enumerate(zip(results, (f.result(1) for f in expected))):
        assert torch.equal(res.mean, want.mean) and res.participants == names
        assert res.bytes_sent == want.bytes_sent < 0.95 * member_bytes(get_codec("e3m0"), 50_000, 3, i)


def test_an_unreachable_bulk_port_falls_back_to_grpc(planes, caplog):
    a, b = planes("a"), planes("b")
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    declared = {"a": address("127.0.0.1", a.port, closed), "b": address("127.0.0.1", b.port, b.bulk_port)}
    xs = [torch.randn(1000), torch.randn(1000)]
    fa, fb = a.average(declared, xs[0]), b.average(declared, xs[1])
    for res in (fa.result(30), fb.result(30)):
        assert torch.allclose(res.mean, (xs[0] + xs[1]) / 2, atol=1e-6)
    assert not b.channels.bulk.reachable("127.0.0.1", closed)
    assert f"bulk port 127.0.0.1:{closed} cannot be reached" in caplog.text


def test_refusals_come_back_with_their_status_and_the_connection_goes_on(planes):
    p = planes("owner")
    ok = pb.Caller(run_id="run", protocol=PROTOCOL_VERSION, config_hash="hash", peer_id="x")
    part = get_codec("fp32").encode(torch.randn(16)).to_bytes()
    cases = [
        (framed(b"\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, b"malformed ReduceRequest"),
        (framed(request(ok, b"\x07garbage")), grpc.StatusCode.INVALID_ARGUMENT, b"malformed payload"),
        (framed(request(pb.Caller(run_id="run", protocol=PROTOCOL_VERSION, config_hash="other", peer_id="x"),
                        part)), grpc.StatusCode.FAILED_PRECONDITION, b"config hash"),
        (bulk.MAGIC + struct.pack("<Q", MAX_BYTES + 1), grpc.StatusCode.RESOURCE_EXHAUSTED, b"--max-message-mb"),
    ]
    for wire, code, text in cases:
        got, details = call_raw(p.bulk_port, wire)
        assert got == code and text in details, (got, details)
    # A refusal does not close the connection: the next call on it is answered too.
    foreign = pb.Caller(run_id="run", protocol=PROTOCOL_VERSION, config_hash="other", peer_id="x")
    with socket.create_connection(("127.0.0.1", p.bulk_port), timeout=10) as s:
        s.sendall(framed(request(ok, b"\x07garbage")))
        assert _recv(s, len(bulk.MAGIC)) == bulk.MAGIC
        for message, expected in ((request(foreign, part), b"malformed payload"), (None, b"config hash")):
            code, n = struct.unpack("<BQ", _recv(s, 9))
            assert expected in _recv(s, n)
            if message is not None:
                s.sendall(struct.pack("<Q", len(message)) + message)  # no second magic on one connection


def test_a_stranger_or_a_stalled_sender_is_cut_off(planes):
    p = planes("owner", reduce_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", p.bulk_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not our protocol: closed, nothing answered
        assert closed(s)
    with socket.create_connection(("127.0.0.1", p.bulk_port), timeout=10) as s:
        s.sendall(bulk.MAGIC + struct.pack("<Q", 1000) + b"only ten b")
        assert _recv(s, len(bulk.MAGIC)) == bulk.MAGIC
        start = time.monotonic()
        assert closed(s)  # once the message is late
        assert time.monotonic() - start < 5
    # The owner still serves others.
    ok = pb.Caller(run_id="run", protocol=PROTOCOL_VERSION, config_hash="hash", peer_id="x")
    assert call_raw(p.bulk_port, framed(request(ok, b"\x07bad")))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_receive_buffers_are_reused_only_once_nothing_holds_them():
    buffers = bulk.Buffers(keep=3)
    first = buffers.get(10_000)
    held = first.obj
    view = torch.frombuffer(first[16:], dtype=torch.uint8)  # a part a round keeps, say
    del first
    second = buffers.get(10_000)
    assert second.obj is not held and len(buffers.kept) == 2  # the first is still in use
    del view, held
    again = buffers.get(10_000)
    assert len(buffers.kept) == 2 and again.obj is buffers.kept[-1] and again.obj is not second.obj
    for n in (5000, 6000, 7000):
        buffers.get(n)
    assert len(buffers.kept) == 3  # the least recently used are let go
    small = bulk.Buffers()
    assert isinstance(small.get(100).obj, bytearray) and not small.kept  # small ones are not kept


def test_an_owner_that_goes_away_leaves_its_callers_clean(planes, caplog):
    a, b = planes("a"), planes("b")
    declared = {p.identity.peer_id: address("127.0.0.1", p.port, p.bulk_port) for p in (a, b)}
    for f in [p.average(declared, torch.randn(100)) for p in (a, b)]:
        f.result(30)
    b.close()  # a's idle connection to b sees it close
    idle = sum(a.channels.bulk.idle.values(), [])
    assert idle and wait_until(lambda: all(c.transport.is_closing() for c in idle))
    assert "Fatal error" not in caplog.text and "get_buffer" not in caplog.text


def test_a_reply_with_its_payload_first_is_read_all_the_same(planes):
    """Our owners put the payload last, and callers read an fp32 mean's values straight into place;
    another implementation may write protobuf's own field order (payload first): still understood."""
    import threading

    from p2pdiloco.swarm import wire

    mean = get_codec("fp32").encode(torch.arange(1000, dtype=torch.float32))
    answer = pb.ReduceReply(payload=mean.to_bytes(), participants=["x"], total_weight=2.0).SerializeToString()
    assert answer[0] >> 3 == wire.REPLY_PAYLOAD  # protobuf writes it first
    server = socket.create_server(("127.0.0.1", 0))

    def owner():
        conn, _ = server.accept()
        with conn:
            conn.sendall(_recv(conn, len(bulk.MAGIC)))
            _recv(conn, struct.unpack("<Q", _recv(conn, 8))[0])
            conn.sendall(struct.pack("<BQ", 0, len(answer)) + answer)

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    p = planes("caller")
    into = torch.full((1000,), -1.0)

    async def call():
        reduce = p.channels.reduce(f"127.0.0.1:9+{server.getsockname()[1]}")
        reply, payload = await reduce(pb.ReduceRequest(round=1), [b"part"], 5.0, memoryview(into.numpy()).cast("B"))
        return reply, bytes(payload)

    reply, payload = p.loop.call(call(), 10)
    thread.join(5)
    server.close()
    assert list(reply.participants) == ["x"] and reply.total_weight == 2.0 and payload == mean.to_bytes()


def test_split_payload_around_finds_a_last_payload_and_only_that():
    from p2pdiloco.swarm import wire

    values = get_codec("fp32").encode(torch.randn(50)).to_bytes()
    head = pb.ReduceReply(participants=["a", "b"], total_weight=3.0)
    ours = b"".join(wire.with_payload(head.SerializeToString(), wire.REPLY_PAYLOAD, [values]))
    for tail in (1, 200, len(values) - 16):
        message, in_place = wire.split_payload_around(memoryview(ours)[:-tail], tail, wire.REPLY_PAYLOAD,
                                                      pb.ReduceReply)
        assert message == head and bytes(in_place.head) + ours[-tail:] == values
    theirs = pb.ReduceReply(payload=values, participants=["a", "b"], total_weight=3.0).SerializeToString()
    assert wire.split_payload_around(memoryview(theirs)[:-200], 200, wire.REPLY_PAYLOAD, pb.ReduceReply) is None
    with pytest.raises(wire.CodecError):  # a payload that is not the fp32 mean expected
        wire.check_in_place(wire.InPlace(memoryview(values)[:16], len(values) - 16), 49)


def test_a_caller_that_gives_up_ends_the_owners_wait_and_a_wait_has_a_bound(planes):
    p = planes("owner", reduce_timeout_s=3.0)
    ok = pb.Caller(run_id="run", protocol=PROTOCOL_VERSION, config_hash="hash", peer_id="x")
    part = get_codec("fp32").encode(torch.randn(16)).to_bytes()  # for a round the owner never opens
    s = socket.create_connection(("127.0.0.1", p.bulk_port), timeout=10)
    s.sendall(framed(request(ok, part)))
    assert _recv(s, len(bulk.MAGIC)) == bulk.MAGIC
    # The part waits for the owner's round ...
    assert wait_until(lambda: any(c.task is not None for c in p.servers.bulk.connections))
    s.close()
    assert wait_until(lambda: not p.servers.bulk.connections, 1.5)  # ... and goes at once, not at its timeout
    # A caller that keeps waiting is answered when the owner's timeout passes.
    start = time.monotonic()
    code, details = call_raw(p.bulk_port, framed(request(ok, part)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and 2.9 < time.monotonic() - start < 8, details


def test_an_idle_or_half_sent_connection_is_closed(planes):
    p = planes("owner")
    p.servers.bulk.idle_s = 0.5
    for extra in (b"", b"\x01\x02\x03"):  # idle after the magic; three of the length's eight bytes
        with socket.create_connection(("127.0.0.1", p.bulk_port), timeout=10) as s:
            s.sendall(bulk.MAGIC + extra)
            assert _recv(s, len(bulk.MAGIC)) == bulk.MAGIC
            start = time.monotonic()
            assert closed(s) and time.monotonic() - start < 5


@pytest.mark.parametrize("impostor", ["http", "silent"])
def test_a_bulk_port_where_something_else_answers_falls_back_to_grpc(planes, impostor, caplog):
    import threading

    a, b = planes("a", reduce_timeout_s=10.0), planes("b", reduce_timeout_s=10.0)  # a silent port costs 5 s
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(15)
    conns = []

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        conns.append(conn)
        if impostor == "http":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    declared = {"a": address("127.0.0.1", a.port, server.getsockname()[1]),
                "b": address("127.0.0.1", b.port, b.bulk_port)}
    xs = [torch.randn(1000), torch.randn(1000)]
    fa, fb = a.average(declared, xs[0]), b.average(declared, xs[1])
    try:
        for res in (fa.result(30), fb.result(30)):
            assert torch.allclose(res.mean, (xs[0] + xs[1]) / 2, atol=1e-6)
        assert "cannot be reached" in caplog.text
    finally:
        thread.join(5)
        for c in conns:
            c.close()
        server.close()

"""The data plane over libp2p streams, for peers that cannot accept connections.

The same messages as the gRPC service (proto/p2pdiloco.proto) and the same servicer: the handlers
are registered on hivemind's P2P, which shares the DHT's `p2pd` daemon, so a peer reachable for the
DHT (directly, or through libp2p's relays and hole punching) is reachable for averaging too. A peer
started with `--transport libp2p` announces the address `p2p:<peer id>`; every peer serves both
transports and calls each peer on the one it announced.
"""
from __future__ import annotations

import asyncio
from contextlib import contextmanager

import grpc

from .gen import p2pdiloco_pb2 as pb

PREFIX = "p2pdiloco.v1.Averaging."
ADDRESS_PREFIX = "p2p:"


class LibP2PError(RuntimeError):
    """A refusal or failure reported by the remote handler (its message says which)."""

    def details(self) -> str:  # the same accessor as grpc's errors, for uniform logging
        return str(self)


@contextmanager
def _as_libp2p_errors(late: str):
    """A call's failures as LibP2PError (a timeout as DEADLINE_EXCEEDED: `late`), as gRPC's stub
    raises its own errors; the end of a stream passes through."""
    try:
        yield
    except (LibP2PError, StopAsyncIteration):
        raise
    except asyncio.TimeoutError:
        raise LibP2PError(f"DEADLINE_EXCEEDED: {late}") from None
    except Exception as exc:
        raise LibP2PError(str(exc)) from None


class _Context:
    """What the servicer uses of a gRPC context: abort() becomes an error sent back to the caller.
    In a closed run, `admitted_peer` is the stream's remote peer id once the caller's certificate
    (in the request) proved it admitted (trust.py); None otherwise, which the servicer refuses."""

    def __init__(self, admitted_peer: str | None = None):
        self.admitted_peer = admitted_peer

    async def abort(self, code, details: str):
        raise LibP2PError(f"{code.name}: {details}")


async def _context(servicer, caller, p2p_context) -> _Context:
    """The servicer's context for a request from the stream's remote peer (Noise proved its id)."""
    trust = servicer.trust
    if trust is None:
        return _Context()
    from .trust import Denied
    remote = str(p2p_context.remote_id)
    try:
        return _Context(trust.libp2p_peer(caller, remote))
    except Denied as exc:
        trust.log_refusal("libp2p", remote, str(exc))
        await _Context().abort(exc.code, f"closed run: {exc}")


async def serve(p2p, servicer, max_message_bytes: int) -> None:
    # Reduce travels on a libp2p stream, one message each way: p2pd caps a unary call's message at
    # 4 MiB, far below a span of a large fragment; a stream's messages have no such cap, so the size
    # is checked here, as gRPC checks `--max-message-mb`.
    async def reduce(request: pb.ReduceRequest, context):
        if request.ByteSize() > max_message_bytes:
            await _Context().abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a Reduce of {request.ByteSize():,} bytes is over "
                                   f"this peer's --max-message-mb ({max_message_bytes:,} bytes)")
        servicer.traffic.add("libp2p", received=request.ByteSize())
        reply = await servicer.Reduce(request, await _context(servicer, request.caller, context))
        servicer.traffic.add("libp2p", sent=reply.ByteSize())
        yield reply

    async def download(request: pb.StateRequest, context):
        async for chunk in servicer.DownloadState(request, await _context(servicer, request.caller, context)):
            yield chunk

    async def probe(request: pb.ProbeRequest, context) -> pb.ProbeReply:
        return await servicer.Probe(request, await _context(servicer, request.caller, context))

    await p2p.add_protobuf_handler(PREFIX + "ReduceStream", reduce, pb.ReduceRequest, stream_output=True)
    await p2p.add_protobuf_handler(PREFIX + "DownloadState", download, pb.StateRequest, stream_output=True)
    await p2p.add_protobuf_handler(PREFIX + "Probe", probe, pb.ProbeRequest)


class LibP2PStub:
    """The client side, shaped like the generated gRPC stub (`Reduce`, `DownloadState`, `Probe`)."""

    def __init__(self, p2p, address: str):
        from hivemind.p2p import PeerID

        self.p2p, self.peer = p2p, PeerID.from_base58(address[len(ADDRESS_PREFIX):])

    async def Reduce(self, request: pb.ReduceRequest, timeout: float) -> pb.ReduceReply:
        async def one_reply() -> pb.ReduceReply:
            replies = await self.p2p.iterate_protobuf_handler(self.peer, PREFIX + "ReduceStream", request,
                                                              pb.ReduceReply)
            async for reply in replies:
                return reply
            raise LibP2PError("UNAVAILABLE: the peer closed the stream without a reply")

        with _as_libp2p_errors(f"no answer within {timeout:.0f}s"):
            return await asyncio.wait_for(one_reply(), timeout)

    async def Probe(self, request: pb.ProbeRequest, timeout: float) -> pb.ProbeReply:
        return await self._call("Probe", request, pb.ProbeReply, timeout)

    async def _call(self, method: str, request, reply_type, timeout: float):
        with _as_libp2p_errors(f"no answer within {timeout:.0f}s"):
            return await asyncio.wait_for(
                self.p2p.call_protobuf_handler(self.peer, PREFIX + method, request, reply_type), timeout)

    def DownloadState(self, request: pb.StateRequest, timeout: float) -> "_Stream":
        return _Stream(self, request, timeout)


class _Stream:
    def __init__(self, stub: LibP2PStub, request: pb.StateRequest, timeout: float):
        self.stub, self.request, self.deadline = stub, request, asyncio.get_running_loop().time() + timeout
        self._iter = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.StateChunk:
        left = self.deadline - asyncio.get_running_loop().time()
        with _as_libp2p_errors("the state download took too long"):
            if self._iter is None:
                self._iter = await asyncio.wait_for(self.stub.p2p.iterate_protobuf_handler(
                    self.stub.peer, PREFIX + "DownloadState", self.request, pb.StateChunk), left)
            return await asyncio.wait_for(self._iter.__anext__(), max(left, 0.01))

    def cancel(self) -> None:
        pass  # the handler's stream closes with the connection's read side

"""How a peer calls the others' Reduce: one gRPC channel per address, bulk connections (bulk.py)
for peers that announced a bulk port, and libp2p streams for peers that announced `p2p:<peer id>`
(libp2p.py). `Channels.reduce(address)` picks the transport from the address alone."""
from __future__ import annotations

import time

import grpc

from .bulk import BulkUnreachable
from .bulk_caller import BulkPool
from .gen import p2pdiloco_pb2 as pb
from .gen import p2pdiloco_pb2_grpc as pb_grpc
from .libp2p import ADDRESS_PREFIX, LibP2PStub
from .records import split_address
from .traffic import Traffic, nbytes
from .wire import REPLY_PAYLOAD, REQUEST_PAYLOAD, SERVICE, split_payload_around, split_reply, with_payload


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class _GrpcReduce:
    """Reduce on a gRPC channel: the request goes out as serialized bytes (see `with_payload`)."""

    def __init__(self, channel: grpc.aio.Channel, traffic: Traffic):
        self.traffic = traffic

        def reply(data: bytes):  # the reply's size on the wire, before it is split
            traffic.add("grpc", received=len(data))
            return split_reply(data)

        self.call = channel.unary_unary(f"/{SERVICE}/Reduce", response_deserializer=reply, _registered_method=True)

    async def __call__(self, request: pb.ReduceRequest, pieces: list, timeout: float, into=None):
        message = b"".join(with_payload(request.SerializeToString(), REQUEST_PAYLOAD, pieces))
        self.traffic.add("grpc", sent=len(message))
        return await self.call(message, timeout=timeout)


class _BulkReduce:
    """Reduce on a peer's bulk port (bulk.py), or over gRPC while that port cannot be reached."""

    def __init__(self, pool: BulkPool, host: str, port: int, fallback: _GrpcReduce, traffic: Traffic):
        self.pool, self.host, self.port, self.fallback, self.traffic = pool, host, port, fallback, traffic

    async def __call__(self, request: pb.ReduceRequest, pieces: list, timeout: float, into=None):
        message = with_payload(request.SerializeToString(), REQUEST_PAYLOAD, pieces)
        start = time.monotonic()
        try:
            got = await self.pool.call(self.host, self.port, message, timeout, into)
        except BulkUnreachable:  # gRPC, in the time the attempt left
            return await self.fallback(request, pieces, max(timeout - (time.monotonic() - start), 1.0))
        self.traffic.add("bulk", sent=nbytes(message), received=nbytes(got))
        if len(got) == 2:  # the reply's tail went straight into `into`: did the payload end there?
            split = split_payload_around(got[0], len(got[1]), REPLY_PAYLOAD, pb.ReduceReply)
            if split is not None:
                return split
        return split_reply(b"".join(got) if len(got) == 2 else got[0])


class _LibP2PReduce:
    def __init__(self, stub: LibP2PStub, traffic: Traffic):
        self.stub, self.traffic = stub, traffic

    async def __call__(self, request: pb.ReduceRequest, pieces: list, timeout: float, into=None):
        request.payload = b"".join(pieces)
        self.traffic.add("libp2p", sent=request.ByteSize())
        reply = await self.stub.Reduce(request, timeout=timeout)
        self.traffic.add("libp2p", received=reply.ByteSize())
        return reply, reply.payload


class Channels:
    """One gRPC channel per remote address, and bulk connections (bulk.py), reused across rounds."""

    def __init__(self, max_message_bytes: int, trust=None, traffic: Traffic | None = None):
        # trust: a closed run (trust.py): gRPC and the bulk port with mutual TLS and the run's CA.
        # traffic: where the bytes of every Reduce are counted (the peer's metrics read it).
        self.options, self.trust = channel_options(max_message_bytes), trust
        self.traffic = traffic if traffic is not None else Traffic()
        if trust is not None:
            self.options += trust.grpc_channel_options()
        self.stubs: dict[str, pb_grpc.AveragingStub] = {}
        self.reducers: dict[str, _GrpcReduce] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.bulk = (BulkPool(max_message_bytes) if trust is None else
                     BulkPool(max_message_bytes, trust.client_ssl(), trust.bulk_encryption))
        self.p2p = None  # hivemind's P2P, for peers that announced a libp2p address (libp2p.py)

    def _libp2p(self, address: str) -> LibP2PStub:
        if self.p2p is None:
            raise RuntimeError(f"{address} is reachable over libp2p only, and libp2p is not up here")
        return LibP2PStub(self.p2p, address)

    def _channel(self, address: str) -> grpc.aio.Channel:
        host, port, _ = split_address(address)
        target = f"{host}:{port}"
        if target not in self.channels:
            self.channels[target] = (grpc.aio.insecure_channel(target, options=self.options) if self.trust is None else
                                     grpc.aio.secure_channel(target, self.trust.grpc_channel_credentials(),
                                                             options=self.options))
        return self.channels[target]

    def stub(self, address: str) -> pb_grpc.AveragingStub:
        if address.startswith(ADDRESS_PREFIX):
            return self._libp2p(address)
        if address not in self.stubs:
            self.stubs[address] = pb_grpc.AveragingStub(self._channel(address))
        return self.stubs[address]

    def reduce(self, address: str):
        """`await reduce(address)(request, payload pieces, timeout, into=None)` → (reply without
        payload, payload). `into`: where the payload's last len(into) bytes may be written by the
        transport itself (the bulk port does); the payload is then `wire.InPlace`."""
        if address.startswith(ADDRESS_PREFIX):
            return _LibP2PReduce(self._libp2p(address), self.traffic)
        if address not in self.reducers:
            self.reducers[address] = _GrpcReduce(self._channel(address), self.traffic)
        host, _, bulk_port = split_address(address)
        host = host.strip("[]")  # an IPv6 address as sockets take it, and as the pool knows it
        if bulk_port is not None and self.bulk.reachable(host, bulk_port):
            return _BulkReduce(self.bulk, host, bulk_port, self.reducers[address], self.traffic)
        return self.reducers[address]

    async def close(self) -> None:
        self.bulk.close()
        for channel in self.channels.values():
            await channel.close(grace=None)

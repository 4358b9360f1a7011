"""Bytes a peer sent and received, per plane of the data plane: the metrics' traffic figures.

Planes: `grpc` (Reduce over gRPC), `bulk` (Reduce on the bulk port), `libp2p` (Reduce over libp2p
streams) and `state` (state downloads, whichever transport carried them). Each figure is a whole
message as the transport carried it (header and payload), counted on both sides: a member counts
its part as sent and the owner's mean as received, an owner the other way round. An owner's reply to
itself never crosses the network and is not counted. DHT traffic (records, matchmaking) is the DHT
daemon's own and not in these figures. A request is counted when it is handed to its transport, so
a call that then fails still counts what it sent; a reply, when it has arrived whole.

The counters are plain integers behind a lock: the data plane bumps them on its event loop, the
metrics read them from the training thread or the HTTP server's; nothing here knows Prometheus.
"""
from __future__ import annotations

import threading

PLANES = ("grpc", "bulk", "libp2p", "state")
DIRECTIONS = ("sent", "received")


class Traffic:
    def __init__(self):
        self._lock = threading.Lock()
        self._bytes = {(p, d): 0 for p in PLANES for d in DIRECTIONS}

    def add(self, plane: str, sent: int = 0, received: int = 0) -> None:
        assert plane in PLANES, plane
        with self._lock:
            self._bytes[plane, "sent"] += sent
            self._bytes[plane, "received"] += received

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{plane: {"sent": bytes, "received": bytes}} for every plane, zeros included."""
        with self._lock:
            return {p: {d: self._bytes[p, d] for d in DIRECTIONS} for p in PLANES}


def nbytes(buffers) -> int:
    """The length of one buffer (bytes, memoryview) or of a list of them, in bytes."""
    if isinstance(buffers, (list, tuple)):
        return sum(nbytes(b) for b in buffers)
    return memoryview(buffers).nbytes

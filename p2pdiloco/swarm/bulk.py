"""Reduce on a plain TCP connection: the data plane's bulk path (the protocol, and the owner's side;
bulk_caller.py has the caller's).

Reduce is the one call that carries tensors, and gRPC's Python API moves a 10 MB message at about
half the speed of loopback TCP whatever its channel options (docs/benchmarks.md, "Data plane").
So next to the gRPC server every peer listens on a second port, its bulk port, for Reduce alone:
the same ReduceRequest and ReduceReply messages of proto/p2pdiloco.proto, byte for byte, each
preceded by its length, read from the socket straight into one buffer of that length. The state
download and the reachability probe stay on gRPC, and so does Reduce towards a peer whose bulk
port cannot be reached (a port forwarded alone, a firewall, some other service there): the caller
falls back to gRPC for that peer, says so once, and tries the bulk port again `RETRY_BULK_S` later.

On the wire (integers little-endian):
  on connecting, caller → owner: `MAGIC`, which names this framing and its version; the owner
           echoes it, so a caller knows it reached a bulk port and not something else;
  request: u64 length, then a serialized ReduceRequest of that length;
  reply:   u8 status (a grpc.StatusCode's number, 0: OK), u64 length, then a serialized
           ReduceReply (status 0) or the refusal's text in UTF-8.
A connection carries one call at a time (bytes sent during a call close it); a caller opens
another for a concurrent call and keeps idle ones for the next rounds.

Limits and timeouts:
- a message longer than `max_message_bytes` is refused (RESOURCE_EXHAUSTED) and the connection
  closed, before any of it is read;
- the magic and its echo must come within `CONNECT_TIMEOUT_S`; a message must arrive whole within
  the round's `reduce_timeout_s` of its length; an owner closes a connection idle for `OWNER_IDLE_S`,
  and a caller drops its own after `CALLER_IDLE_S` (earlier, so it never reuses one the owner is
  closing); TCP keepalive on both ends; at most `MAX_CONNECTIONS` callers at once per owner;
- the owner answers within `reduce_timeout_s` (DEADLINE_EXCEEDED past it), and a caller that
  closes its connection cancels the owner's handler, as a gRPC deadline does; a caller waits for
  its answer at most the call's timeout, then closes the connection.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from .trust import tls_peer

log = logging.getLogger("p2pdiloco.dataplane")

MAGIC = b"p2pdiloco-bulk1\n"
CONNECT_TIMEOUT_S = 5.0  # to connect and exchange the magic
RETRY_BULK_S = 60.0  # after the bulk port of a peer could not be reached, use gRPC this long
OWNER_IDLE_S = 300.0  # an owner closes a connection with no call for this long
CALLER_IDLE_S = 60.0  # a caller does not reuse a connection idle for longer (NATs drop idle flows)
MAX_CONNECTIONS = 256  # callers connected to one owner at once; more are refused
MAX_REFUSAL_BYTES = 1 << 16  # a refusal's text; a longer one is a broken or hostile owner
# Over TLS (a closed run) a message goes to the transport in pieces of this size, one per event-loop
# turn: handed over whole, the TLS layer encrypted all of it into one growing memory buffer before
# sending any, fresh memory whose page faults and copies cost more CPU than the encryption.
TLS_CHUNK = 1 << 16
LENGTH = struct.Struct("<Q")
REPLY_HEAD = struct.Struct("<BQ")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


class BulkError(Exception):
    """A refused or failed call, with a gRPC status code as gRPC's own errors have."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class BulkUnreachable(ConnectionError):
    """The bulk port could not be connected to: the caller may use gRPC instead."""


class Buffers:
    """Receive buffers, kept for reuse. A fresh 10 MB buffer costs ~2,500 page faults, the kernel
    zeroing each page it maps, on every message; a kept one costs none. A kept buffer is handed out
    again only once nothing holds it: no view of it is alive (a part that a round keeps, a reply
    being decoded), which its reference count tells. Each event loop has its own (not thread-safe)."""

    def __init__(self, keep: int = 32, keep_bytes: int = 1 << 30):
        self.keep, self.keep_bytes = keep, keep_bytes
        self.kept: list[np.ndarray] = []

    def get(self, n: int) -> memoryview:
        if n < 4096:  # headers and refusals: cheap, and they must not push the big ones out
            return memoryview(bytearray(n))
        for i in range(len(self.kept)):
            # Held by the list, and by getrefcount's argument: by nothing else.
            if self.kept[i].size == n and sys.getrefcount(self.kept[i]) == 2:
                self.kept.append(self.kept.pop(i))  # the most recently used go last
                return memoryview(self.kept[-1])
        # Not zeroed (the kernel is about to overwrite it), and from torch's allocator: numpy asks
        # for transparent huge pages, whose faults can stall for compaction (150 ms seen here).
        fresh = torch.empty(n, dtype=torch.uint8).numpy()
        self.kept.append(fresh)
        while len(self.kept) > self.keep or sum(a.size for a in self.kept) > self.keep_bytes:
            self.kept.pop(0)  # the least recently used; whoever still holds it keeps it alive
        return memoryview(fresh)


class Framed(asyncio.BufferedProtocol):
    """Reads exactly the number of bytes it is told to expect, each time into a buffer of that
    size (from `buffers`) that the kernel writes into directly, and hands the full buffer on."""

    def __init__(self, buffers: Buffers):
        self.buffers = buffers
        self.transport: asyncio.Transport | None = None
        self._view, self._got, self._then = None, 0, None
        self._timer: asyncio.TimerHandle | None = None
        self.tls = False
        self._sending: asyncio.Future | None = None

    def expect(self, n: int, then, within_s: float | None = None, into: memoryview | None = None) -> None:
        """Read the next n bytes into `into` (n bytes long) or a buffer of `buffers`, then call `then`."""
        self._cancel_timer()
        if within_s is not None:
            self._timer = asyncio.get_running_loop().call_later(within_s, self._too_slow)
        if n == 0:
            then(memoryview(b""))
            return
        self._view, self._got, self._then = (self.buffers.get(n) if into is None else into), 0, then

    def get_buffer(self, sizehint: int):
        # Between messages the event loop may still read (an EOF, or bytes nobody asked for).
        return self._view[self._got:] if self._view is not None else memoryview(bytearray(64))

    def buffer_updated(self, nbytes: int) -> None:
        if self._view is None:
            log.warning("bulk connection with %s: %d bytes that were not asked for; closing it",
                        self.transport.get_extra_info("peername"), nbytes)
            self.transport.abort()
            return
        self._got += nbytes
        if self._got == len(self._view):
            buf, then = self._view, self._then
            self._view = self._then = None
            then(buf)

    def send(self, pieces: list) -> None:
        """Write one message's pieces, in order (see TLS_CHUNK). One message at a time per connection."""
        if not self.tls or sum(memoryview(p).nbytes for p in pieces) <= TLS_CHUNK:
            self.transport.writelines(pieces)
        else:
            self._sending = asyncio.ensure_future(self._send_chunks(pieces))

    async def _send_chunks(self, pieces: list) -> None:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            for i in range(0, len(view), TLS_CHUNK):
                if self.transport.is_closing():
                    return
                self.transport.write(view[i:i + TLS_CHUNK])
                await asyncio.sleep(0)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("sslcontext") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a peer that vanished (power, a NAT's state) is noticed, not waited on
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        if self._sending is not None:
            self._sending.cancel()

    def pause_writing(self) -> None:  # the other end does not read: stop taking its requests
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        log.info("bulk connection with %s: nothing more came in time; closing it",
                 self.transport.get_extra_info("peername"))
        self.transport.abort()


class _OwnerSide(Framed):
    """One caller's connection to this peer's bulk port."""

    def __init__(self, server: "BulkServer"):
        super().__init__(server.buffers)
        self.server, self.task, self.peer = server, None, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.server.ssl is not None:  # TLS verified the caller's certificate: whom it names
            self.peer = tls_peer(transport.get_extra_info("peercert"))
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("bulk port: %d callers connected already; refused one from %s", MAX_CONNECTIONS,
                        transport.get_extra_info("peername"))
            transport.abort()
            return
        self.server.connections.add(self)
        self.expect(len(MAGIC), self._magic, CONNECT_TIMEOUT_S)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self.task is not None:  # the caller gave up: so does the handler
            self.task.cancel()

    def eof_received(self) -> bool:
        if self.task is not None:
            self.task.cancel()
        return False  # close

    def _magic(self, got: memoryview) -> None:
        if got != MAGIC:
            log.warning("bulk port: a connection from %s did not speak p2pdiloco's bulk protocol; closed",
                        self.transport.get_extra_info("peername"))
            self.transport.abort()
            return
        self.transport.write(MAGIC)
        self.expect(LENGTH.size, self._length, self.server.idle_s)

    def _length(self, head: memoryview) -> None:
        (n,) = LENGTH.unpack(head)
        if n > self.server.max_message_bytes:
            log.warning("bulk port: refused a message of %d bytes (over --max-message-mb)", n)
            self._answer(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"message of {n} bytes is over this peer's limit of {self.server.max_message_bytes} "
                         f"bytes (--max-message-mb)".encode())
            self.transport.close()  # after the answer is written; the message itself is never read
            return
        self.expect(n, self._request, self.server.timeout_s)

    def _request(self, body: memoryview) -> None:
        # Reading goes on during the call: a caller that closes the connection cancels it (and one
        # that sends more before its answer is closed: one call at a time).
        self._cancel_timer()
        self.task = asyncio.ensure_future(self._handle(body))

    async def _handle(self, body: memoryview) -> None:
        try:
            call = self.server.handler(body) if self.server.ssl is None else self.server.handler(body, self.peer)
            code, data = grpc.StatusCode.OK, await asyncio.wait_for(call, self.server.timeout_s)
        except asyncio.TimeoutError:
            code, data = grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.server.timeout_s:g}s".encode()
        except BulkError as exc:
            code, data = exc.code(), exc.details().encode()
        except DecodeError as exc:
            code, data = grpc.StatusCode.INVALID_ARGUMENT, f"malformed ReduceRequest: {exc}".encode()
        except Exception as exc:  # a bug here must cost this call, not the peer
            log.exception("bulk Reduce failed")
            code, data = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}".encode()
        finally:
            self.task = None
        if self.transport.is_closing():
            return
        self._answer(code, data)
        self.expect(LENGTH.size, self._length, self.server.idle_s)

    def _answer(self, code: grpc.StatusCode, data: bytes | list) -> None:
        pieces = data if isinstance(data, list) else [data]
        self.send([REPLY_HEAD.pack(code.value[0], sum(len(p) for p in pieces)), *pieces])


class BulkServer:
    """This peer's bulk port. `handler(request bytes) -> reply` (bytes, or a list of buffers to
    write one after the other) raises BulkError to refuse. With `ssl` (a closed run, trust.py) the
    port speaks TLS and requires a client certificate, and the handler is called as
    `handler(request bytes, peer id the certificate names)`."""

    def __init__(self, handler, max_message_bytes: int, timeout_s: float, idle_s: float = OWNER_IDLE_S,
                 ssl=None):
        self.handler, self.max_message_bytes, self.timeout_s, self.idle_s = handler, max_message_bytes, timeout_s, idle_s
        self.ssl = ssl
        self.connections: set[_OwnerSide] = set()
        self.buffers = Buffers()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); the port bound."""
        tls = {} if self.ssl is None else {"ssl": self.ssl, "ssl_handshake_timeout": CONNECT_TIMEOUT_S}
        self.server = await asyncio.get_running_loop().create_server(lambda: _OwnerSide(self), host, port, **tls)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.connections):
                conn.transport.abort()
            await self.server.wait_closed()

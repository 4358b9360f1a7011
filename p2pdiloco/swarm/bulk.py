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

from .bulk_seal import Handshakes, InvalidTag, Opener, Seal, owner_handshake

log = logging.getLogger("p2pdiloco.dataplane")

MAGIC = b"p2pdiloco-bulk1\n"
CONNECT_TIMEOUT_S = 5.0  # to connect and exchange the magic
RETRY_BULK_S = 60.0  # after the bulk port of a peer could not be reached, use gRPC this long
OWNER_IDLE_S = 300.0  # an owner closes a connection with no call for this long
CALLER_IDLE_S = 60.0  # a caller does not reuse a connection idle for longer (NATs drop idle flows)
MAX_CONNECTIONS = 256  # callers connected to one owner at once; more are refused
MAX_REFUSAL_BYTES = 1 << 16  # a refusal's text; a longer one is a broken or hostile owner
MAX_HANDSHAKES = 16  # a closed run's TLS handshakes under way at once, per owner; more are refused
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
    size (from `buffers`) that the kernel writes into directly, and hands the full buffer on.
    With a `seal` (a closed run, bulk_seal.py) what is read and written are sealed messages, each
    opened whole before any of it is handed on; a message larger than what is expected next is
    handed on in views of its own buffer, without copies."""

    def __init__(self, buffers: Buffers, seal: Seal | None = None, limit: int = 0):
        self.buffers = buffers
        self.transport: asyncio.Transport | None = None
        self._want: int | None = None
        self._view, self._got, self._then = None, 0, None
        self._timer: asyncio.TimerHandle | None = None
        self.seal = seal
        self._opener = None if seal is None else Opener(seal, buffers, limit)

    def expect(self, n: int, then, within_s: float | None = None, into: memoryview | None = None) -> None:
        """Read the next n bytes into `into` (n bytes long) or a buffer of `buffers`, then call `then`."""
        self._cancel_timer()
        if within_s is not None:
            self._timer = asyncio.get_running_loop().call_later(within_s, self._too_slow)
        if n == 0:
            then(memoryview(b""))
            return
        self._want, self._view, self._got, self._then = n, into, 0, then

    def _target(self) -> memoryview:
        if self._view is None:  # taken when the first byte comes: a sealed message may bring its own
            self._view = self.buffers.get(self._want)
        return self._view

    def get_buffer(self, sizehint: int):
        if self._opener is not None:
            return self._opener.get_buffer()
        # Between messages the event loop may still read (an EOF, or bytes nobody asked for).
        return self._target()[self._got:] if self._want is not None else memoryview(bytearray(64))

    def buffer_updated(self, nbytes: int) -> None:
        if self._opener is not None:
            try:
                message = self._opener.updated(nbytes)
            except (InvalidTag, OverflowError) as exc:
                why = "a message failed its integrity check" if isinstance(exc, InvalidTag) else str(exc)
                self._refuse(why)
                return
            if message is not None:
                self._deliver(message)
            return
        if self._want is None:
            self._refuse(f"{nbytes} bytes that were not asked for")
            return
        self._got += nbytes
        if self._got == self._want:
            self._complete(self._view)

    def _deliver(self, message: memoryview) -> None:
        at = 0
        while at < len(message) and not self.transport.is_closing():
            if self._want is None:
                self._refuse(f"{len(message) - at} bytes that were not asked for")
                return
            take = min(self._want - self._got, len(message) - at)
            if self._got == 0 and self._view is None and take == self._want:
                self._complete(message[at:at + take])
            else:
                self._target()[self._got:self._got + take] = message[at:at + take]
                self._got += take
                if self._got == self._want:
                    self._complete(self._view)
            at += take

    def _complete(self, buf: memoryview) -> None:
        then = self._then
        self._want = self._view = self._then = None
        then(buf)

    def _refuse(self, why: str) -> None:
        log.warning("bulk connection with %s: %s; closing it", self.transport.get_extra_info("peername"), why)
        self.transport.abort()

    def send(self, head: bytes, body: list) -> None:
        """Write one message: its head, then its body's pieces. Sealed, they are two messages, so
        the other end checks the head (a length against its limit) before it reads the body."""
        if self.seal is None:
            self.transport.writelines([head, *body])
            return
        for pieces in ([head], body):
            out = self.buffers.get(Seal.sealed_size(sum(memoryview(p).nbytes for p in pieces)))
            self.transport.write(self.seal.seal(pieces, out))

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a peer that vanished (power, a NAT's state) is noticed, not waited on
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def connection_lost(self, exc) -> None:
        self._cancel_timer()

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

    def __init__(self, server: "BulkServer", seal: Seal | None = None, peer: str | None = None):
        super().__init__(server.buffers, seal, server.max_message_bytes)
        self.server, self.task, self.peer = server, None, peer  # peer: whom the caller's certificate names

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("bulk port: %d callers connected already; refused one from %s", MAX_CONNECTIONS,
                        transport.get_extra_info("peername"))
            transport.abort()
            return
        self.server.connections.add(self)
        if self.server.handshakes is None:
            self.expect(len(MAGIC), self._magic, CONNECT_TIMEOUT_S)
        else:  # the handshake exchanged the magic
            self.expect(LENGTH.size, self._length, self.server.idle_s)

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
            call = (self.server.handler(body) if self.server.handshakes is None else
                    self.server.handler(body, self.peer))
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
        self.send(REPLY_HEAD.pack(code.value[0], sum(len(p) for p in pieces)), pieces)


class BulkServer:
    """This peer's bulk port. `handler(request bytes) -> reply` (bytes, or a list of buffers to
    write one after the other) raises BulkError to refuse. With `ssl` (a closed run, trust.py) each
    connection starts with bulk_seal.py's handshake (TLS with a client certificate, then sealed
    messages or, both ends asking, plain ones: `encryption`), the handler is called as
    `handler(request bytes, peer id the certificate names)`, and `refused(address, why)` hears of
    every connection whose handshake failed."""

    def __init__(self, handler, max_message_bytes: int, timeout_s: float, idle_s: float = OWNER_IDLE_S,
                 ssl=None, encryption: str = "aes-gcm", refused=None):
        self.handler, self.max_message_bytes, self.timeout_s, self.idle_s = handler, max_message_bytes, timeout_s, idle_s
        self.handshakes = None if ssl is None else Handshakes(ssl, encryption, CONNECT_TIMEOUT_S, MAX_HANDSHAKES)
        self.refused = refused or (lambda who, why: log.info("bulk port: refused %s: %s", who, why))
        self.connections: set[_OwnerSide] = set()
        self.buffers = Buffers()
        self.server: asyncio.Server | None = None
        self.listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._admitting: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); the port bound."""
        loop = asyncio.get_running_loop()
        if self.handshakes is None:
            self.server = await loop.create_server(lambda: _OwnerSide(self), host, port)
            return self.server.sockets[0].getsockname()[1]
        family = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0][0]
        self.listener = socket.create_server((host, port), family=family, backlog=128)
        self.listener.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept())
        return self.listener.getsockname()[1]

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of file descriptors, say: the port must live on
                log.warning("bulk port: accept failed (%s)", exc)
                await asyncio.sleep(0.1)
                continue
            if (self.handshakes.busy >= self.handshakes.max_at_once
                    or len(self.connections) + len(self._admitting) >= MAX_CONNECTIONS):
                self.refused(f"{addr[0]}:{addr[1]}", "too many connections or handshakes at once")
                sock.close()
                continue
            task = asyncio.ensure_future(self._admit(sock, addr))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, sock: socket.socket, addr) -> None:
        try:
            raw, seal, peer = await self.handshakes.run(owner_handshake, sock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a stranger, another run's CA, a scanner, a slow or broken caller
            self.refused(f"{addr[0]}:{addr[1]}", f"TLS handshake failed: {str(exc) or type(exc).__name__}")
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: _OwnerSide(self, seal, peer), raw)
        except OSError:
            raw.close()

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            for task in list(self._admitting):
                task.cancel()
            self.listener.close()
            self.handshakes.close()
        for conn in list(self.connections):
            conn.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

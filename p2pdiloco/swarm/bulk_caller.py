"""The caller's side of the bulk port (bulk.py has the protocol and the owner's side): connections
to other peers' bulk ports, each carrying one call at a time, kept open between calls."""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import grpc

from .bulk import (LENGTH, REPLY_HEAD, CALLER_IDLE_S, CONNECT_TIMEOUT_S, MAGIC, MAX_HANDSHAKES, MAX_REFUSAL_BYTES,
                   RETRY_BULK_S, BulkError, BulkUnreachable, Buffers, Framed, status_code)
from .bulk_seal import Handshakes, Seal, caller_handshake

log = logging.getLogger("p2pdiloco.dataplane")


class _CallerSide(Framed):
    """A connection to another peer's bulk port, for one call at a time."""

    def __init__(self, max_message_bytes: int, buffers: Buffers, seal: Seal | None = None,
                 handshaken: bool = False):
        super().__init__(buffers, seal, max(max_message_bytes, MAX_REFUSAL_BYTES))
        self.max_message_bytes, self.handshaken = max_message_bytes, handshaken
        self.reply: asyncio.Future | None = None
        self.status = grpc.StatusCode.OK
        self.into: memoryview | None = None
        self.prefix: memoryview | None = None
        self.idle_since = time.monotonic()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(BulkError(grpc.StatusCode.UNAVAILABLE, f"the owner closed the connection ({exc})"))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.reply = asyncio.get_running_loop().create_future()
        if self.handshaken:  # bulk_seal.py's handshake exchanged the magic
            self.reply.set_result(None)
            return
        # Expect the echo before anything can arrive: whatever answers may speak first.
        self.expect(len(MAGIC), self._echo)
        transport.write(MAGIC)

    async def handshake(self) -> None:
        """Wait for the magic's echo; BulkUnreachable if what answers is not a bulk port."""
        await self.reply

    def _echo(self, got: memoryview) -> None:
        if got == MAGIC:
            self.reply.set_result(None)
        else:
            self.reply.set_exception(BulkUnreachable("something other than a p2pdiloco bulk port answers there"))
            self.transport.abort()

    async def call(self, pieces: list, into: memoryview | None = None) -> list[memoryview]:
        """Send one request (its serialized pieces); the reply's bytes, or BulkError. With `into`,
        a reply longer than it has its last len(into) bytes read straight into it: [the bytes
        before, into]; else [the reply]."""
        self.reply = asyncio.get_running_loop().create_future()
        self.into = into
        self.expect(REPLY_HEAD.size, self._head)
        self.send(LENGTH.pack(sum(len(p) for p in pieces)), pieces)
        code, body = await self.reply
        if code != grpc.StatusCode.OK:
            raise BulkError(code, bytes(body[0]).decode(errors="replace"))
        return body

    def _head(self, head: memoryview) -> None:
        number, n = REPLY_HEAD.unpack(head)
        self.status = status_code(number)
        if n > (self.max_message_bytes if self.status == grpc.StatusCode.OK else MAX_REFUSAL_BYTES):
            self.reply.set_exception(BulkError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                               f"the owner's {self.status.name} answer of {n} bytes is over the limit "
                                               f"({'--max-message-mb' if self.status == grpc.StatusCode.OK else 'a refusal'})"))
            self.transport.abort()
            return
        if self.status == grpc.StatusCode.OK and self.into is not None and n > len(self.into):
            self.expect(n - len(self.into), self._prefix)
        else:
            self.expect(n, self._body)

    def _prefix(self, prefix: memoryview) -> None:
        self.prefix = prefix
        self.expect(len(self.into), self._tail, into=self.into)

    def _tail(self, tail: memoryview) -> None:
        if not self.reply.done():
            self.reply.set_result((self.status, [self.prefix, tail]))
        self.prefix = self.into = None

    def _body(self, body: memoryview) -> None:
        if not self.reply.done():
            self.reply.set_result((self.status, [body]))
        self.into = None


class BulkPool:
    """Connections to other peers' bulk ports, kept open between calls."""

    def __init__(self, max_message_bytes: int, ssl=None, encryption: str = "aes-gcm"):
        self.max_message_bytes = max_message_bytes
        # A closed run: its client context (trust.py), for bulk_seal.py's handshake on every connection.
        self.handshakes = None if ssl is None else Handshakes(ssl, encryption, CONNECT_TIMEOUT_S, MAX_HANDSHAKES)
        self.idle: dict[tuple[str, int], list[_CallerSide]] = {}
        self.buffers = Buffers()
        self.unreachable_until: dict[tuple[str, int], float] = {}

    def reachable(self, host: str, port: int) -> bool:
        return time.monotonic() >= self.unreachable_until.get((host, port), 0.0)

    async def _connect(self, host: str, port: int, timeout_s: float) -> _CallerSide:
        conn = None
        try:
            async with asyncio.timeout(min(CONNECT_TIMEOUT_S, timeout_s)):
                loop = asyncio.get_running_loop()
                if self.handshakes is None:
                    _, conn = await loop.create_connection(
                        lambda: _CallerSide(self.max_message_bytes, self.buffers), host, port)
                else:
                    raw, seal, _ = await self.handshakes.run(caller_handshake, await self._dial(host, port))
                    _, conn = await loop.create_connection(
                        lambda: _CallerSide(self.max_message_bytes, self.buffers, seal, handshaken=True), sock=raw)
                await conn.handshake()
        except Exception as exc:  # refused, silent, closed, or something else answers: no bulk port here
            if conn is not None:
                conn.transport.abort()
            why = str(exc) or type(exc).__name__
            if (host, port) not in self.unreachable_until:  # said once; retried quietly
                log.warning("bulk port %s:%d cannot be reached (%s); Reduce goes over gRPC to it, and the bulk "
                            "port is tried again every %.0fs", host, port, why, RETRY_BULK_S)
            self.unreachable_until[host, port] = time.monotonic() + RETRY_BULK_S
            raise BulkUnreachable(f"{host}:{port}: {why}") from None
        return conn

    @staticmethod
    async def _dial(host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def call(self, host: str, port: int, pieces: list, timeout_s: float,
                   into: memoryview | None = None) -> list[memoryview]:
        """One Reduce: the reply's bytes, as `_CallerSide.call` gives them. BulkUnreachable if no
        connection could be made, BulkError if the owner refused or failed it, or gave no answer
        within `timeout_s` (DEADLINE_EXCEEDED)."""
        idle = self.idle.setdefault((host, port), [])
        conn = None
        while idle and conn is None:
            candidate = idle.pop()
            if candidate.transport.is_closing() or time.monotonic() - candidate.idle_since > CALLER_IDLE_S:
                candidate.transport.abort()
            else:
                conn = candidate
        deadline = time.monotonic() + timeout_s
        if conn is None:
            conn = await self._connect(host, port, timeout_s)
        try:
            body = await asyncio.wait_for(conn.call(pieces, into), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            conn.transport.abort()
            raise BulkError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:g}s") from None
        except BaseException:
            conn.transport.abort()  # mid-call: the connection cannot carry another call
            raise
        conn.idle_since = time.monotonic()
        idle.append(conn)
        return body

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.transport.abort()
        self.idle.clear()
        if self.handshakes is not None:
            self.handshakes.close()

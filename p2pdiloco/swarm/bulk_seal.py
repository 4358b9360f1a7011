"""A closed run's bulk connections (docs/swarm.md, "Closed runs"): TLS 1.3 with the run's CA proves
who is at each end, agrees on keys, and steps aside; the messages after it are sealed whole with
AES-GCM under those keys (`--bulk-encryption aes-gcm`, the default), or go as they are (`none`, when
both ends ask for it: a network that is already private, such as a WireGuard overlay).

Why TLS steps aside: Python's `ssl` on an event loop moves every byte through memory BIOs in 16 KiB
records, which doubled the CPU of an average on loopback (docs/benchmarks.md, "Closed runs").
Sealing a message at once with OpenSSL's AES-GCM (through `cryptography`) costs one pass over its
bytes, on each end.

The handshake, on a fresh TCP connection, in a thread of its own (blocking `ssl`, which can hand the
connection back: `unwrap`), within `CONNECT_TIMEOUT_S` whatever the other end does:
  1. TLS 1.3, both certificates the run CA's, the client's required;
  2. inside TLS, caller -> owner: HELLO (`MAGIC`, the mode it wants, 32 random bytes);
     owner -> caller: HELLO (`MAGIC`, the mode used: the stronger of the two, 32 random bytes);
  3. both close TLS (close_notify each way) and keep the TCP connection.
Keys: HKDF-SHA256 over both random values (secret: they travelled inside TLS) gives one AES-128 key
per direction. A message's nonce is its number on the connection, in its direction: a message
replayed, reordered or dropped fails to open, and one from another connection was sealed under
other keys.

A sealed message on the wire: u64 length L of the plaintext, then L bytes of ciphertext, then the
16-byte tag; the length is the associated data. Each `Framed.send` is one message.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct

from concurrent.futures import ThreadPoolExecutor

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .admission import SERVER_NAME
from .trust import tls_peer

MODES = ("none", "aes-gcm")  # weakest first: an index is a strength
HELLO_MAGIC = b"p2pdiloco-bulk2\n"
HELLO = struct.Struct(f"<{len(HELLO_MAGIC)}sB32s")
HEAD = struct.Struct("<Q")
TAG = 16
SCRATCH = 1 << 20  # ciphertext is read in pieces of at most this size, and opened while still in cache


class HandshakeError(ConnectionError):
    pass


class Seal:
    """One connection's keys and message counters, for one end of it."""

    def __init__(self, send_key: bytes, receive_key: bytes):
        self._send_key, self._receive_key = send_key, receive_key
        self.sent = self.received = 0

    @staticmethod
    def _nonce(n: int) -> bytes:
        return n.to_bytes(12, "little")

    def seal(self, pieces: list, out: memoryview) -> memoryview:
        """The pieces, sealed as one message, written into `out` (at least `sealed_size` long)."""
        views = [memoryview(p).cast("B") for p in pieces]
        n = sum(len(v) for v in views)
        out[:HEAD.size] = HEAD.pack(n)
        enc = Cipher(algorithms.AES(self._send_key), modes.GCM(self._nonce(self.sent))).encryptor()
        enc.authenticate_additional_data(out[:HEAD.size])
        at = HEAD.size
        for v in views:
            at += enc.update_into(v, out[at:])
        enc.finalize()
        out[at:at + TAG] = enc.tag
        self.sent += 1
        return out[:at + TAG]

    @staticmethod
    def sealed_size(n: int) -> int:
        return HEAD.size + n + TAG + 15  # update_into asks for a block's room beyond what it writes

    def opener(self, head: memoryview):
        """A decryptor for the next message, whose head (its length) was just read."""
        dec = Cipher(algorithms.AES(self._receive_key), modes.GCM(self._nonce(self.received))).decryptor()
        dec.authenticate_additional_data(bytes(head))
        self.received += 1
        return dec


class Opener:
    """Reads sealed messages off a connection: the event loop's reads land in a small buffer, which is
    opened into the message's own buffer at once. A message is handed on only once its tag checks
    out; a bad tag raises InvalidTag (the connection must be closed: it can carry nothing more)."""

    def __init__(self, seal: Seal, buffers, limit: int):
        self.seal, self.buffers, self.limit = seal, buffers, limit
        self._head = memoryview(bytearray(HEAD.size))
        self._scratch = memoryview(bytearray(SCRATCH))
        self._tag = memoryview(bytearray(TAG))
        self._got = 0  # of the current part: head, ciphertext or tag
        self._n = None  # the current message's plaintext length, once its head is in
        self._out = self._dec = None

    def get_buffer(self) -> memoryview:
        if self._n is None:
            return self._head[self._got:]
        if self._got < self._n:
            return self._scratch[:min(SCRATCH, self._n - self._got)]
        return self._tag[self._got - self._n:]

    def updated(self, nbytes: int) -> memoryview | None:
        """`nbytes` more were read into the last buffer given: the opened message, once it is whole."""
        if self._n is None:
            self._got += nbytes
            if self._got < HEAD.size:
                return None
            (n,) = HEAD.unpack(self._head)
            if n > self.limit:
                raise OverflowError(f"a sealed message of {n} bytes, over the limit of {self.limit}")
            self._n, self._got = n, 0
            self._out = self.buffers.get(n + 15)  # 15: update_into's room
            self._dec = self.seal.opener(self._head)
            return None
        if self._got < self._n:
            self._got += self._dec.update_into(self._scratch[:nbytes], self._out[self._got:])
            return None
        self._got += nbytes
        return self._finish() if self._got == self._n + TAG else None

    def _finish(self) -> memoryview:
        self._dec.finalize_with_tag(bytes(self._tag))
        out, n = self._out, self._n
        self._n, self._got, self._out, self._dec = None, 0, None, None
        return out[:n]


def _keys(caller_random: bytes, owner_random: bytes) -> tuple[bytes, bytes]:
    """(caller -> owner key, owner -> caller key)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"p2pdiloco bulk keys v2").derive(caller_random + owner_random)
    return okm[:16], okm[16:]


def _read_hello(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    got = b""
    while len(got) < HELLO.size:
        more = tls.recv(HELLO.size - len(got))
        if not more:
            raise HandshakeError("the other end closed the connection during the handshake")
        got += more
    magic, mode, random = HELLO.unpack(got)
    if magic != HELLO_MAGIC:
        raise HandshakeError("the other end does not speak p2pdiloco's bulk protocol (version 2)")
    if mode >= len(MODES):
        raise HandshakeError(f"unknown bulk encryption mode {mode}")
    return mode, random


def caller_handshake(sock: socket.socket, context: ssl.SSLContext, mode: str):
    """The caller's side, on a connected blocking socket: (the socket, Seal or None, the owner's
    peer id). Raises ssl.SSLError, OSError or HandshakeError."""
    tls = context.wrap_socket(sock, server_hostname=SERVER_NAME)
    mine = os.urandom(32)
    tls.sendall(HELLO.pack(HELLO_MAGIC, MODES.index(mode), mine))
    used, theirs = _read_hello(tls)
    if used < MODES.index(mode):
        raise HandshakeError(f"the owner answered with bulk encryption '{MODES[used]}', weaker than '{mode}'")
    peer = tls_peer(tls.getpeercert())
    raw = tls.unwrap()
    to_owner, to_caller = _keys(mine, theirs)
    return raw, (Seal(to_owner, to_caller) if MODES[used] != "none" else None), peer


def owner_handshake(sock: socket.socket, context: ssl.SSLContext, mode: str):
    """The owner's side, on an accepted blocking socket: (the socket, Seal or None, the caller's
    peer id, which TLS verified against the run's CA)."""
    tls = context.wrap_socket(sock, server_side=True)
    wanted, theirs = _read_hello(tls)
    used = max(wanted, MODES.index(mode))
    mine = os.urandom(32)
    tls.sendall(HELLO.pack(HELLO_MAGIC, used, mine))
    peer = tls_peer(tls.getpeercert())
    raw = tls.unwrap()
    to_owner, to_caller = _keys(theirs, mine)
    return raw, (Seal(to_caller, to_owner) if MODES[used] != "none" else None), peer


class Handshakes:
    """Runs handshakes (`caller_handshake`, `owner_handshake`) in threads of their own, at most
    `max_at_once` at a time, each within `timeout_s` whatever the other end does: at the deadline the
    connection is shut down under the thread, which then fails at once."""

    def __init__(self, context: ssl.SSLContext, mode: str, timeout_s: float, max_at_once: int):
        if mode not in MODES:
            raise ValueError(f"bulk encryption '{mode}' is unknown; use one of {', '.join(MODES)}")
        self.context, self.mode, self.timeout_s, self.max_at_once = context, mode, timeout_s, max_at_once
        self._pool = ThreadPoolExecutor(max_at_once, thread_name_prefix="p2pdiloco-bulk-tls")
        self.busy = 0

    async def run(self, handshake, sock: socket.socket):
        """(socket, Seal or None, peer id) from `handshake` on `sock` (which it takes over), or the
        error that ended it (TimeoutError past the deadline)."""
        loop = asyncio.get_running_loop()
        guard = sock.dup()  # shuts the connection down at the deadline, whoever holds the socket then
        sock.setblocking(True)
        sock.settimeout(self.timeout_s)  # each step; the guard bounds them all together
        self.busy += 1
        work = loop.run_in_executor(self._pool, _closing_on_error, handshake, sock, self.context, self.mode)
        try:
            raw, seal, peer = await asyncio.wait_for(asyncio.shield(work), self.timeout_s)
        except BaseException:
            with contextlib.suppress(OSError):
                guard.shutdown(socket.SHUT_RDWR)
            work.add_done_callback(_close_result)  # should it still have succeeded
            raise
        finally:
            self.busy -= 1
            guard.close()
        raw.setblocking(False)
        return raw, seal, peer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _closing_on_error(handshake, sock, context, mode):
    try:
        return handshake(sock, context, mode)
    except BaseException:
        sock.close()
        raise


def _close_result(work) -> None:
    if not work.cancelled() and work.exception() is None:
        work.result()[0].close()


__all__ = ["MODES", "Seal", "Opener", "InvalidTag", "HandshakeError", "caller_handshake", "owner_handshake", "Handshakes"]

"""The data plane: one group average (reduce-scatter + all-gather) over gRPC, served on grpc.aio.

`allreduce` is the member's side: it cuts its encoded vector into the group's spans, opens its own
span in the `RoundBook` and calls `Reduce` on every other owner with its part of that owner's span.
The `Servicer` is the owner's side: each `Reduce` call waits in the book until the owner has all the
group's parts, or until `reduce_timeout_s` after the owner opened the round, and is answered with the
encoded weighted mean of the parts present. So a member that died or froze costs the others at most
that timeout, and the parts it did send still count.

Everything that arrives is checked before it is used: the caller's run, protocol version and config
hash (a mismatch is refused with FAILED_PRECONDITION, never averaged), the group id, the payload's
codec, length and finiteness (INVALID_ARGUMENT). Oversized messages are refused by gRPC itself
(RESOURCE_EXHAUSTED, `max_message_bytes`). None of these fails the owner's round.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
import torch

from ..averaging import AverageResult, SyncKey, span_bounds, weighted_mean
from ..codecs import CodecError, Encoded, from_bytes
from .gen import p2pdiloco_pb2 as pb
from .gen import p2pdiloco_pb2_grpc as pb_grpc
from .libp2p import ADDRESS_PREFIX, LibP2PStub
from .matchmaking import Group
from .records import PROTOCOL_VERSION

log = logging.getLogger("p2pdiloco.dataplane")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Identity:
    run_id: str
    config_hash: str
    peer_id: str
    codec: str

    def caller(self) -> pb.Caller:
        return pb.Caller(run_id=self.run_id, protocol=PROTOCOL_VERSION, config_hash=self.config_hash,
                         peer_id=self.peer_id)

    def check(self, caller: pb.Caller) -> None:
        if caller.protocol != PROTOCOL_VERSION:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version {caller.protocol} != {PROTOCOL_VERSION}: upgrade the older peer")
        if caller.run_id != self.run_id:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"run '{caller.run_id}' is not this peer's run '{self.run_id}'")
        if caller.config_hash != self.config_hash:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"config hash {caller.config_hash} != {self.config_hash}: peers of one run must train the "
                          f"same model, fragments, codec and schedule")


@dataclass
class _Round:
    """One span this peer owns in one average: the parts received so far and the answer."""
    group_id: bytes | None = None
    members: frozenset[str] = frozenset()
    numel: int = -1
    # Parts are kept decoded (fp32): each is decoded once, when it is checked on arrival.
    parts: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    early: dict[str, tuple[bytes, torch.Tensor, float]] = field(default_factory=dict)  # before the owner opened
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    reply: pb.ReduceReply | None = None
    aborted: bool = False  # the owner's own average failed: every member's must fail too
    created: float = field(default_factory=time.monotonic)


class RoundBook:
    """The spans this peer owns, one `_Round` per SyncKey, kept until `reduce_timeout_s` after the
    answer (late parts are then refused rather than silently dropped)."""

    def __init__(self, identity: Identity, reduce_timeout_s: float):
        self.identity, self.timeout = identity, reduce_timeout_s
        self.rounds: dict[SyncKey, _Round] = {}

    def _gc(self) -> None:  # rounds whose owner never came (it left, or is far behind)
        for k in [k for k, r in self.rounds.items() if time.monotonic() - r.created > 4 * self.timeout]:
            del self.rounds[k]

    async def own(self, group: Group, part: Encoded, weight: float) -> tuple[pb.ReduceReply, int]:
        """Open my span; returns the reply every member gets and the bytes I sent answering them."""
        self._gc()
        rnd = self.rounds.setdefault(group.key, _Round())
        async with rnd.changed:
            rnd.group_id, rnd.numel = group.group_id, part.numel
            rnd.members = frozenset(m.peer_id for m in group.members)
            rnd.parts[self.identity.peer_id] = (part.decode(), weight)  # my part, as the others see it
            for sender, (gid, values, w) in rnd.early.items():
                if gid == group.group_id and sender in rnd.members and values.numel() == part.numel:
                    rnd.parts[sender] = (values, w)
            rnd.early.clear()
            rnd.changed.notify_all()  # early callers whose part did not fit learn it now
            try:
                await asyncio.wait_for(rnd.changed.wait_for(
                    lambda: set(rnd.parts) >= rnd.members or rnd.aborted), self.timeout)
            except asyncio.TimeoutError:
                log.warning("%s: %d of %d parts after %.1fs; averaging the parts present", group.key,
                            len(rnd.parts), len(rnd.members), self.timeout)
            if rnd.aborted:
                raise RuntimeError(f"{group.key} aborted")
            names = sorted(rnd.parts)
            parts = [rnd.parts[n] for n in names]
            if sum(w for _, w in parts) <= 0:  # nobody trained since the last round: plain mean
                parts = [(enc, 1.0) for enc, _ in parts]
            mean = await asyncio.get_running_loop().run_in_executor(None, weighted_mean, parts)
            payload = part.codec.encode(mean).to_bytes()
            rnd.reply = pb.ReduceReply(payload=payload, participants=names,
                                       total_weight=float(sum(w for _, w in parts)))
            rnd.changed.notify_all()
        asyncio.get_running_loop().call_later(self.timeout, self.rounds.pop, group.key, None)
        return rnd.reply, len(payload) * (len(names) - 1)

    async def abort(self, key: SyncKey) -> None:
        """My average of `key` failed: fail the members' calls for my span too, so that a round
        is applied by all of a group's members or by none (their global copies stay equal)."""
        rnd = self.rounds.get(key)
        if rnd is not None:
            async with rnd.changed:
                if rnd.reply is None:
                    rnd.aborted = True
                rnd.changed.notify_all()

    async def receive(self, request: pb.ReduceRequest) -> pb.ReduceReply:
        self.identity.check(request.caller)
        key = SyncKey(request.kind, request.index, request.round)
        sender = request.caller.peer_id
        if not math.isfinite(request.weight) or request.weight < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"weight {request.weight} is not a finite count of tokens")
        try:
            enc = from_bytes(request.payload)
        except CodecError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed payload: {exc}") from None
        if enc.codec.name != self.identity.codec:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"payload codec {enc.codec.name} != the run's {self.identity.codec}")
        values = enc.decode()
        if not torch.isfinite(values).all():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "payload holds non-finite values")
        rnd = self.rounds.setdefault(key, _Round())
        async with rnd.changed:
            if rnd.reply is not None:
                raise Refused(grpc.StatusCode.ABORTED, f"{key} is already averaged; this part came too late")
            if rnd.group_id is None:  # the owner has not reached this round yet: hold the part
                rnd.early[sender] = (request.group_id, values, request.weight)
            elif request.group_id != rnd.group_id or sender not in rnd.members or enc.numel != rnd.numel:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{sender}'s part does not fit my group for {key}")
            else:
                rnd.parts[sender] = (values, request.weight)
                rnd.changed.notify_all()
            # The caller's deadline bounds this wait: gRPC cancels the handler when it passes.
            await rnd.changed.wait_for(lambda: rnd.reply is not None or rnd.aborted or
                                       (rnd.group_id is not None and sender not in rnd.parts))
            if rnd.aborted:
                raise Refused(grpc.StatusCode.ABORTED, f"the owner's own average of {key} failed")
            if rnd.reply is None or sender not in rnd.parts:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{sender}'s part does not fit my group for {key}")
            return rnd.reply


class Servicer(pb_grpc.AveragingServicer):
    def __init__(self, book: RoundBook, state_provider):
        self.book, self.state_provider = book, state_provider

    async def Reduce(self, request, context):
        try:
            return await self.book.receive(request)
        except Refused as exc:
            log.warning("refused a part from %s: %s", request.caller.peer_id or "?", exc)
            await context.abort(exc.code, str(exc))

    async def DownloadState(self, request, context):
        try:
            self.book.identity.check(request.caller)
            blob = await self.state_provider(set(request.fragments) or None)
        except Refused as exc:
            await context.abort(exc.code, str(exc))
        except Exception as exc:  # no snapshot in time: the newcomer asks another peer
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no state to give: {exc}")
        digest = hashlib.sha256(blob).digest()
        chunk = 1 << 20
        for i in range(0, max(len(blob), 1), chunk):
            first = i == 0
            yield pb.StateChunk(total_bytes=len(blob) if first else 0, sha256=digest if first else b"",
                                data=blob[i: i + chunk])


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class Channels:
    """One gRPC channel per remote address, reused across rounds."""

    def __init__(self, max_message_bytes: int):
        self.options = channel_options(max_message_bytes)
        self.stubs: dict[str, pb_grpc.AveragingStub] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.p2p = None  # hivemind's P2P, for peers that announced a libp2p address (libp2p.py)

    def stub(self, address: str) -> pb_grpc.AveragingStub:
        if address.startswith(ADDRESS_PREFIX):
            if self.p2p is None:
                raise RuntimeError(f"{address} is reachable over libp2p only, and libp2p is not up here")
            return LibP2PStub(self.p2p, address)
        if address not in self.stubs:
            channel = grpc.aio.insecure_channel(address, options=self.options)
            self.channels.append(channel)
            self.stubs[address] = pb_grpc.AveragingStub(channel)
        return self.stubs[address]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(grace=None)


async def allreduce(book: RoundBook, channels: Channels, group: Group, encoded: Encoded, weight: float,
                    timeout_s: float) -> AverageResult:
    """Average `encoded` within `group`; raises if any span's owner cannot answer within timeout_s."""
    spans = span_bounds(encoded.numel, group.size, encoded.codec.align)
    caller = book.identity.caller()
    sent = 0

    async def call(i: int) -> pb.ReduceReply:
        nonlocal sent
        lo, hi = spans[i]
        payload = encoded.slice(lo, hi).to_bytes()
        sent += len(payload)
        request = pb.ReduceRequest(caller=caller, kind=group.key.kind, index=group.key.index,
                                   round=group.key.round, group_id=group.group_id, weight=weight, payload=payload)
        return await channels.stub(group.members[i].address).Reduce(request, timeout=timeout_s)

    me = group.my_index
    lo, hi = spans[me]
    own = asyncio.ensure_future(book.own(group, encoded.slice(lo, hi), weight))
    tasks = [asyncio.ensure_future(call(i)) if i != me else own for i in range(group.size)]
    try:
        for done in asyncio.as_completed([t for t in tasks if t is not own]):
            try:
                await done
            except Exception:
                # This average cannot complete here (an owner died, or it averaged this round without
                # us): fail my span too rather than let some members apply a round that others skip.
                await book.abort(group.key)
                break
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            who = group.members[i].peer_id
            detail = r.details() if hasattr(r, "details") else repr(r)
            raise RuntimeError(f"span {i} owned by {who[-8:]} failed: {detail}") from None
    replies = [r if i != me else r[0] for i, r in enumerate(results)]
    sent += results[me][1]
    mean, participants, total = torch.empty(encoded.numel, dtype=torch.float32), set(), 0.0
    for i, reply in enumerate(replies):
        enc = from_bytes(reply.payload)
        lo, hi = spans[i]
        if enc.numel != hi - lo:
            raise RuntimeError(f"span {i}: {enc.numel} values in the mean, expected {hi - lo}")
        mean[lo:hi] = enc.decode()
        participants.update(reply.participants)
        total = max(total, reply.total_weight)
    return AverageResult(mean, tuple(sorted(participants)), total, sent)

"""The data plane: one group average (reduce-scatter + all-gather), whichever transport carries it
(channels.py: the bulk port, gRPC or libp2p; each peer serves all three with this one `Servicer`).

`allreduce` is the member's side: it cuts its encoded vector into the group's spans, opens its own
span in the `RoundBook` and calls `Reduce` on every other owner with its part of that owner's span.
The `Servicer` is the owner's side: each `Reduce` call waits in the book until the owner has all the
group's parts, or until `reduce_timeout_s` after the owner opened the round, and is answered with the
encoded weighted mean of the parts present. So a member that died or froze costs the others at most
that timeout, and the parts it did send still count.

Everything that arrives is checked before it is used: the caller's run, protocol version and config
hash (a mismatch is refused with FAILED_PRECONDITION, never averaged), the group id, the payload's
codec, length and finiteness (INVALID_ARGUMENT). Oversized messages are refused by the transport
(RESOURCE_EXHAUSTED, `max_message_bytes`). None of these fails the owner's round.

On gRPC and the bulk port, Reduce's payload bypasses protobuf's copies (wire.py); the bytes on the
wire are the proto's messages all the same, and libp2p carries them as protobuf messages.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial

import grpc
import torch

from ..aggregation import AggregateConfig, check_mean
from ..averaging import AverageResult, SyncKey, reduce_parts, span_bounds
from ..codecs import CastCodec, CodecError, Encoded, parse_header
from .gen import p2pdiloco_pb2 as pb
from .gen import p2pdiloco_pb2_grpc as pb_grpc
from . import reachability
from .matchmaking import Group
from .bulk import BulkError, Buffers
from .channels import Channels
from .records import PROTOCOL_VERSION
from .traffic import Traffic, nbytes
from .wire import (REPLY_PAYLOAD, SERVICE, InPlace, check_in_place, split_request,
                   with_payload)

log = logging.getLogger("p2pdiloco.dataplane")


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or ±inf in x: min and max propagate NaN, and are 30× faster than isfinite(x).all()."""
    if not x.numel():
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


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
    cert: bytes = b""  # a closed run: this peer's admission certificate (DER), for libp2p's callees (trust.py)

    def caller(self) -> pb.Caller:
        return pb.Caller(run_id=self.run_id, protocol=PROTOCOL_VERSION, config_hash=self.config_hash,
                         peer_id=self.peer_id, cert=self.cert)

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


# Spans of a plain cast codec (fp32, bf16, fp16) up to this many values are averaged on the event
# loop itself, a few ms of memory passes: handed to a thread, each of the reply's torch calls waited
# for the GIL behind the loop's own work, up to the 5 ms switch interval each (20-60 ms per reply
# seen on 2 loaded cores, against 3-15 ms inline). E3M0's reply (a fused sum and an encode) is more
# compute than waiting, and runs in a thread, where it overlaps the loop's transfers (bench
# allreduce: 0.14 s in a thread, 0.18-0.25 s inline). Larger spans always go to a thread, so that
# the loop is never blocked for long.
INLINE_REPLY_NUMEL = 1 << 23


@dataclass
class _Round:
    """One span this peer owns in one average: the parts received so far and the answer."""
    group_id: bytes | None = None
    members: frozenset[str] = frozenset()
    numel: int = -1
    # Parts are kept decoded (fp32), each decoded once when it is checked on arrival; those of a codec
    # that cannot decode to non-finite values (E3M0) are kept encoded, and weighted_mean accumulates
    # them without decoding each.
    # Once the reply is made only the names are kept (values None): a part held until the round is
    # dropped, `reduce_timeout_s` later, would keep its receive buffer from the bulk port's reuse,
    # and the next round would read into fresh memory, the kernel zeroing every page (bench allreduce).
    parts: dict[str, tuple[torch.Tensor | Encoded, float] | None] = field(default_factory=dict)
    # Parts that came before the owner opened the round: (group id, part, weight).
    early: dict[str, tuple[bytes, torch.Tensor | Encoded, float]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # The ReduceReply, the same for every member, serialized as buffers to write one after the
    # other (the bulk port does), and joined once if a transport needs one `bytes`. Dropped once
    # every member whose part it holds has been answered, which frees the mean for reuse.
    reply: list | None = None
    joined: bytes | None = None
    done: bool = False  # the reply was made (it may have been dropped since)
    answered: set[str] = field(default_factory=set)
    aborted: bool = False  # the owner's own average failed: every member's must fail too
    created: float = field(default_factory=time.monotonic)

    def answer(self, sender: str, owner: str, joined: bool) -> list | bytes:
        """The reply for `sender` (joined into one `bytes`, or as buffers)."""
        if joined and self.joined is None:
            self.joined = b"".join(self.reply)
        reply = self.joined if joined else self.reply
        self.answered.add(sender)
        if self.answered >= set(self.parts) - {owner}:
            self.reply = self.joined = None
        return reply


class RoundBook:
    """The spans this peer owns, one `_Round` per SyncKey, kept until `reduce_timeout_s` after the
    answer (late parts are then refused rather than silently dropped)."""

    # The default is the plain mean (the data plane's own tests and bench allreduce); a peer's
    # Network passes its --aggregate (centered-clip unless told otherwise).
    def __init__(self, identity: Identity, reduce_timeout_s: float, aggregate: AggregateConfig = AggregateConfig(method="mean")):
        self.identity, self.timeout, self.aggregate = identity, reduce_timeout_s, aggregate
        self.poison = None  # bench attack's lying owner: a function of the fp32 mean (adversary.py)
        self.rounds: dict[SyncKey, _Round] = {}
        # The fp32 sums of my spans, reused once nothing holds them (an fp32 mean is sent as it is;
        # other codecs' are encoded from it): a fresh 10 MB one costs ~2,500 page faults, the kernel
        # zeroing each page, more CPU than the sum itself. Taken on the loop (Buffers is not thread-safe).
        self.means = Buffers(keep=8)

    def _gc(self) -> None:  # rounds whose owner never came (it left, or is far behind)
        for k in [k for k, r in self.rounds.items() if time.monotonic() - r.created > 4 * self.timeout]:
            del self.rounds[k]

    async def own(self, group: Group, part: Encoded, weight: float) -> tuple[pb.ReduceReply, Encoded, int]:
        """Open my span; returns the reply every member gets (without its payload), the encoded
        mean of my span (its payload) and the bytes I sent answering them."""
        self._gc()
        rnd = self.rounds.setdefault(group.key, _Round())
        async with rnd.changed:
            rnd.group_id, rnd.numel = group.group_id, part.numel
            rnd.members = frozenset(m.peer_id for m in group.members)
            rnd.parts[self.identity.peer_id] = (_kept(part), weight)  # my part, as the others see it
            for sender, (gid, values, w) in rnd.early.items():
                if gid == group.group_id and sender in rnd.members and _numel(values) == part.numel:
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
            total = float(sum(w for _, w in parts))
            out = torch.frombuffer(self.means.get(part.numel * 4), dtype=torch.float32) if part.numel else None
            agg = self.aggregate
            if isinstance(part.codec, CastCodec) and part.numel <= INLINE_REPLY_NUMEL and agg.method == "mean":
                head, mean, pieces = _reply(part.codec, parts, names, total, agg, out)
            else:
                head, mean, pieces = await asyncio.get_running_loop().run_in_executor(
                    None, _reply, part.codec, parts, names, total, agg, out)
            if self.poison is not None:  # an adversarial owner (adversary.py, bench attack only)
                mean = part.codec.encode(self.poison(mean.decode()))
                pieces = mean.pieces()
            rnd.reply, rnd.done = with_payload(head.SerializeToString(), REPLY_PAYLOAD, pieces), True
            rnd.parts = dict.fromkeys(rnd.parts)
            rnd.changed.notify_all()
        asyncio.get_running_loop().call_later(self.timeout, self.rounds.pop, group.key, None)
        return head, mean, sum(len(p) for p in pieces) * (len(names) - 1)

    async def abort(self, key: SyncKey) -> None:
        """My average of `key` failed: fail the members' calls for my span too, so that a round
        is applied by all of a group's members or by none (their global copies stay equal)."""
        rnd = self.rounds.get(key)
        if rnd is not None:
            async with rnd.changed:
                if not rnd.done:
                    rnd.aborted = True
                rnd.changed.notify_all()

    async def receive(self, request: pb.ReduceRequest, payload=None, joined: bool = False) -> list | bytes:
        """One member's part of my span (`payload`, or the request's own): the reply, once it is
        ready (as buffers, or joined into one `bytes`)."""
        self.identity.check(request.caller)
        key = SyncKey(request.kind, request.index, request.round)
        sender = request.caller.peer_id
        if not math.isfinite(request.weight) or request.weight < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"weight {request.weight} is not a finite count of tokens")
        try:
            enc = await _parse(request.payload if payload is None else payload)
        except CodecError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed payload: {exc}") from None
        if enc.codec.name != self.identity.codec:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"payload codec {enc.codec.name} != the run's {self.identity.codec}")
        values = _kept(enc)
        if not enc.codec.decodes_finite and not all_finite(values):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "payload holds non-finite values")
        rnd = self.rounds.setdefault(key, _Round())
        async with rnd.changed:
            if rnd.done:
                raise Refused(grpc.StatusCode.ABORTED, f"{key} is already averaged; this part came too late")
            if rnd.group_id is None:  # the owner has not reached this round yet: hold the part
                rnd.early[sender] = (request.group_id, values, request.weight)
            elif request.group_id != rnd.group_id or sender not in rnd.members or enc.numel != rnd.numel:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{sender}'s part does not fit my group for {key}")
            else:
                rnd.parts[sender] = (values, request.weight)
                rnd.changed.notify_all()
            # The caller's deadline bounds this wait: gRPC cancels the handler when it passes.
            await rnd.changed.wait_for(lambda: rnd.done or rnd.aborted or
                                       (rnd.group_id is not None and sender not in rnd.parts))
            if rnd.aborted:
                raise Refused(grpc.StatusCode.ABORTED, f"the owner's own average of {key} failed")
            if not rnd.done or sender not in rnd.parts:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{sender}'s part does not fit my group for {key}")
            if rnd.reply is None or sender in rnd.answered:
                raise Refused(grpc.StatusCode.ABORTED, f"{sender} sent a second part for {key}; it was answered once")
            return rnd.answer(sender, self.identity.peer_id, joined)


async def _parse(payload) -> Encoded:
    """wire.parse_payload (a view of `payload`, no copy), with an entropy-coded payload's decoding (a zlib pass, which lets go of the
    GIL) in a thread rather than on the event loop that carries every transfer."""
    codec, numel, body = parse_header(payload)
    if codec.variable_size:
        return await asyncio.get_running_loop().run_in_executor(None, partial(codec.from_bytes, body, numel, copy=False))
    return codec.from_bytes(body, numel, copy=False)


def _kept(enc: Encoded) -> torch.Tensor | Encoded:
    """A part as the round keeps it: decoded, unless its codec cannot decode to non-finite values."""
    return enc if enc.codec.decodes_finite else enc.decode()


def _numel(part: torch.Tensor | Encoded) -> int:
    return part.numel if isinstance(part, Encoded) else part.numel()


def _reply(codec, parts: list[tuple[torch.Tensor | Encoded, float]], names: list[str],
           total: float, agg: AggregateConfig, out: torch.Tensor | None = None) -> tuple[pb.ReduceReply, Encoded, list]:
    """The owner's answer for all members: who took part, and the encoded mean of the parts by the
    owner's aggregation method (aggregation.py; accumulated in `out` if given), with its payload's
    pieces (an entropy-coded mean is coded here, in the same thread)."""
    mean = codec.encode(reduce_parts(parts, agg, out))
    return pb.ReduceReply(participants=names, total_weight=total), mean, mean.pieces()


class Servicer(pb_grpc.AveragingServicer):
    """`trust` (trust.py): a closed run's checks; None: an open run, anyone who knows it may call.
    `traffic`: where the bytes served are counted (traffic.py; the peer's metrics read it)."""

    def __init__(self, book: RoundBook, state_provider, trust=None, traffic: Traffic | None = None):
        self.book, self.state_provider, self.trust = book, state_provider, trust
        self.traffic = traffic if traffic is not None else Traffic()

    def admit(self, caller: pb.Caller, context=None, peer: str | None = None) -> None:
        """A closed run: Refused unless the transport proved an admitted peer that is `caller`.
        The peer comes from gRPC's TLS (`context`), the bulk port's (`peer`), or a libp2p stream's
        checked certificate (the context libp2p.py makes carries it as `admitted_peer`)."""
        if self.trust is None:
            return
        from .trust import Denied
        try:
            if peer is None and context is not None:
                peer = context.admitted_peer if hasattr(context, "admitted_peer") else self.trust.grpc_peer(context)
            self.trust.check(caller, peer)
        except Denied as exc:
            self.trust.log_refusal("data-plane", peer or caller.peer_id or "?", str(exc))
            raise Refused(exc.code, f"closed run: {exc}") from None

    async def reduce(self, request: pb.ReduceRequest, payload, context) -> bytes | None:
        try:
            self.admit(request.caller, context)
            return await self.book.receive(request, payload, joined=True)
        except Refused as exc:
            log.warning("refused a part from %s: %s", request.caller.peer_id or "?", exc)
            await context.abort(exc.code, str(exc))

    async def Reduce(self, request: pb.ReduceRequest, context) -> pb.ReduceReply:
        """Reduce with protobuf messages (the libp2p transport); gRPC calls `reduce` (see `serve`)."""
        return pb.ReduceReply.FromString(await self.reduce(request, None, context))

    async def _reduce_wire(self, request: tuple, context) -> bytes:
        reply = await self.reduce(*request, context)  # gRPC only: libp2p calls Reduce
        if reply is not None:
            self.traffic.add("grpc", sent=len(reply))
        return reply

    async def reduce_bulk(self, data: memoryview, peer: str | None = None) -> list:
        """Reduce on the bulk port (bulk.py): the serialized request in, the serialized reply out
        (as buffers to write one after the other). `peer`: who TLS says is calling (a closed run)."""
        request, payload = split_request(data)
        self.traffic.add("bulk", received=nbytes(data))
        try:
            self.admit(request.caller, peer=peer)
            reply = await self.book.receive(request, payload)
            self.traffic.add("bulk", sent=nbytes(reply))
            return reply
        except Refused as exc:
            log.warning("refused a part from %s: %s", request.caller.peer_id or "?", exc)
            raise BulkError(exc.code, str(exc)) from None

    async def Probe(self, request: pb.ProbeRequest, context) -> pb.ProbeReply:
        """Dial a joining peer's gRPC address for it, or answer a ping (reachability.py)."""
        try:
            self.admit(request.caller, context)
            self.book.identity.check(request.caller)
        except Refused as exc:
            await context.abort(exc.code, str(exc))
        return await reachability.answer(self.book.identity, request, self.trust)

    async def DownloadState(self, request, context):
        try:
            self.admit(request.caller, context)
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
            self.traffic.add("state", sent=len(blob[i: i + chunk]))
            yield pb.StateChunk(total_bytes=len(blob) if first else 0, sha256=digest if first else b"",
                                data=blob[i: i + chunk])


def serve(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the Averaging service on `server`: the generated handlers, except that Reduce takes
    and gives its payload without protobuf's copies (the same messages on the wire)."""
    def reduce_request(data: bytes) -> tuple:  # the request's size on the wire, before it is split
        servicer.traffic.add("grpc", received=len(data))
        return split_request(data)

    handlers = {
        "Reduce": grpc.unary_unary_rpc_method_handler(servicer._reduce_wire, request_deserializer=reduce_request),
        "DownloadState": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadState, request_deserializer=pb.StateRequest.FromString,
            response_serializer=pb.StateChunk.SerializeToString),
        "Probe": grpc.unary_unary_rpc_method_handler(
            servicer.Probe, request_deserializer=pb.ProbeRequest.FromString,
            response_serializer=pb.ProbeReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def allreduce(book: RoundBook, channels: Channels, group: Group, encoded: Encoded, weight: float,
                    timeout_s: float, out: torch.Tensor | None = None, check_ratio: float | None = None,
                    device: torch.device | None = None) -> AverageResult:
    """Average `encoded` within `group`; raises if any span's owner cannot answer within timeout_s,
    or (with `check_ratio`, see `_check_spans`) if a span's mean fails this member's check.
    The mean is written into `out` when it has the right size (a buffer reused from an earlier
    average: a fresh 40 MB one costs more in page faults than decoding into it); each span is
    decoded into it as its answer comes, while the others are still on their way. With a `device`
    other than the CPU, each span's encoded mean is also copied there as it comes (the result's
    `encoded`), for a peer that trains there to decode: its bytes, not the fp32 mean, cross."""
    spans = span_bounds(encoded.numel, group.size, encoded.codec.align)
    caller = book.identity.caller()
    fits = out is not None and out.numel() == encoded.numel and out.dtype == torch.float32
    mean = out if fits else torch.empty(encoded.numel, dtype=torch.float32)
    sent = 0
    # Copied now: a received span may view a buffer that is reused once this call returns.
    on_device: list[Encoded | None] | None = [None] * group.size if device is not None and device.type != "cpu" else None

    async def take(i: int, reply: pb.ReduceReply, payload) -> pb.ReduceReply:
        lo, hi = spans[i]
        if isinstance(payload, InPlace):  # the values are in mean[lo:hi] already
            check_in_place(payload, hi - lo)
            if on_device is not None:  # an fp32 mean: its bytes are the values
                raw = mean[lo:hi].view(torch.uint8)
                on_device[i] = Encoded(encoded.codec, hi - lo, raw[:0], raw).to(device)
            return reply
        enc = payload if isinstance(payload, Encoded) else await _parse(payload)
        if enc.numel != hi - lo:
            raise RuntimeError(f"{enc.numel} values in the mean, expected {hi - lo}")
        enc.codec.decode_into(enc, mean[lo:hi])
        if on_device is not None:
            on_device[i] = enc.to(device)
        return reply

    async def call(i: int) -> pb.ReduceReply:
        nonlocal sent
        lo, hi = spans[i]
        part = encoded.slice(lo, hi)
        # An entropy-coded part is coded now: a CPU pass (zlib lets go of the GIL) off the event loop.
        pieces = await asyncio.get_running_loop().run_in_executor(None, part.pieces) if part.codec.variable_size \
            else part.pieces()
        sent += sum(len(p) for p in pieces)
        request = pb.ReduceRequest(caller=caller, kind=group.key.kind, index=group.key.index,
                                   round=group.key.round, group_id=group.group_id, weight=weight)
        # An fp32 mean's values are the bytes on the wire: the bulk port reads them straight into place.
        into = memoryview(mean[lo:hi].numpy()).cast("B") if encoded.codec.name == "fp32" and hi > lo else None
        return await take(i, *await channels.reduce(group.members[i].address)(request, pieces, timeout_s, into))

    async def own(i: int) -> pb.ReduceReply:
        nonlocal sent
        lo, hi = spans[i]
        reply, my_mean, nbytes = await book.own(group, encoded.slice(lo, hi), weight)
        sent += nbytes
        return await take(i, reply, my_mean)

    me = group.my_index
    mine = asyncio.ensure_future(own(me))
    tasks = [asyncio.ensure_future(call(i)) if i != me else mine for i in range(group.size)]
    try:
        for done in asyncio.as_completed([t for t in tasks if t is not mine]):
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
    participants, total = set(), 0.0
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            who = group.members[i].peer_id
            detail = r.details() if hasattr(r, "details") else str(r) or repr(r)
            raise RuntimeError(f"span {i} owned by {who[-8:]} failed: {detail}") from None
        participants.update(r.participants)
        total = max(total, r.total_weight)
    if check_ratio is not None:  # a pass over the vector: off the loop that carries every transfer
        await asyncio.get_running_loop().run_in_executor(None, _check_spans, mean, encoded, spans, group, check_ratio)
    return AverageResult(mean, tuple(sorted(participants)), total, sent, tuple(on_device or ()))


def _check_spans(mean: torch.Tensor, encoded: Encoded, spans, group: Group, ratio: float) -> None:
    """Every span's mean is the claim of one owner: refuse the round (raise) if one is non-finite or
    far larger than this member's own Δ over that span (aggregation.check_mean), so that a lying
    owner makes the round fail here rather than poison this peer's global copy."""
    mine = encoded.decode()
    for i, (lo, hi) in enumerate(spans):
        why = check_mean(mean[lo:hi], mine[lo:hi], ratio)
        if why:
            raise MeanRefused(group.members[i].peer_id, f"refused the mean of span {i} owned by "
                                                        f"{group.members[i].peer_id[-8:]}: {why}")


class MeanRefused(RuntimeError):
    """A span's mean failed this member's check: the round fails here, and its owner is suspect."""

    def __init__(self, owner: str, message: str):
        super().__init__(message)
        self.owner = owner

"""`--transport auto`: can the other peers reach this one on the gRPC address it would announce?

A peer that joins a run asks a live peer to dial that address (the `Probe` call of
proto/p2pdiloco.proto, sent over whichever transport the prober announced): the prober opens a
fresh gRPC channel to it and pings it, and the ping must come back with the asking peer's id, so
an address where some other server answers does not count. Reachable: the peer announces gRPC, the
faster transport. Not reachable (behind NAT, a firewall, a wrong `--announce-host`): it announces
its libp2p address `p2p:<peer id>` and others average with it through the DHT's daemon. No answer
(no live peer yet, an older peer, a timeout): it announces gRPC, as before probing existed, and
says so. The first peer of a run has nobody to ask and announces gRPC.

Timeouts: the prober's dial and ping take at most `PING_TIMEOUT_S`; the asking peer waits at most
`PROBE_TIMEOUT_S` for each of at most `MAX_PROBERS` peers.
"""
from __future__ import annotations

import asyncio
import logging
import random

import grpc

from .gen import p2pdiloco_pb2 as pb
from .gen import p2pdiloco_pb2_grpc as pb_grpc

log = logging.getLogger("p2pdiloco.network")

PING_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = PING_TIMEOUT_S + 3.0
MAX_PROBERS = 2


async def answer(identity, request: pb.ProbeRequest) -> pb.ProbeReply:
    """The prober's side (the caller's identity is already checked). An empty address is a ping."""
    if not request.address:
        return pb.ProbeReply(reachable=True, detail=identity.peer_id)
    channel = grpc.aio.insecure_channel(request.address)
    try:
        ping = pb.ProbeRequest(caller=identity.caller())
        reply = await pb_grpc.AveragingStub(channel).Probe(ping, timeout=PING_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return pb.ProbeReply(reachable=False, detail=f"{exc.code().name}: {exc.details()}")
    except Exception as exc:  # a malformed address: grpc raises ValueError or the like
        return pb.ProbeReply(reachable=False, detail=f"{type(exc).__name__}: {exc}")
    finally:
        await channel.close(grace=None)
    if reply.detail != request.caller.peer_id:
        return pb.ProbeReply(reachable=False, detail=f"another peer ({reply.detail or 'unknown'}) answers there")
    return pb.ProbeReply(reachable=True)


async def check(channels, identity, records, address: str) -> tuple[bool | None, str]:
    """Ask up to MAX_PROBERS of the live peers `records` whether `address` reaches this peer:
    (True or False, and from whom or why not), or (None, why nobody could tell)."""
    others = [r for r in records if r.peer_id != identity.peer_id and r.state != "left"]
    if not others:
        return None, "no other live peer to ask"
    reasons = []
    for rec in random.sample(others, min(MAX_PROBERS, len(others))):
        request = pb.ProbeRequest(caller=identity.caller(), address=address)
        try:
            reply = await asyncio.wait_for(channels.stub(rec.address).Probe(request, timeout=PROBE_TIMEOUT_S),
                                           PROBE_TIMEOUT_S + 1)
        except Exception as exc:  # an older peer (UNIMPLEMENTED), a dead one, a timeout: ask the next
            detail = exc.details() if hasattr(exc, "details") else repr(exc)
            reasons.append(f"{rec.peer_id[-8:]}: {detail}")
            continue
        who = rec.peer_id[-8:]
        return (True, f"peer {who} reached it") if reply.reachable else (False, f"peer {who}: {reply.detail}")
    return None, "; ".join(reasons)

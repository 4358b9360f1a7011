"""`--transport auto`: can the other peers reach this one on the gRPC address it would announce?

A peer that joins a run asks a live peer to dial that address (the `Probe` call of
proto/p2pdiloco.proto, sent over whichever transport the prober announced): the prober opens a
fresh gRPC channel to it and pings it, and the ping must come back with the asking peer's id, so
an address where some other server answers does not count. Reachable: the peer announces gRPC, the
faster transport. Not reachable (behind NAT, a firewall, a wrong `--announce-host`): it announces
its libp2p address `p2p:<peer id>` and others average with it through the DHT's daemon. No answer
(no live peer yet, an older peer, a timeout): it announces gRPC, as before probing existed, and
says so. The first peer of a run has nobody to ask and announces gRPC.

Not reachable means no prober reached it (one that could not dial out does not decide alone when
there is another live peer to ask; the second peer of a run has only the first), in two attempts
`RETRY_AFTER_S` apart (a prober on a loaded machine may time out once).
Timeouts: the prober's dial and ping take at most `PING_TIMEOUT_S`; the asking peer waits at most
`PROBE_TIMEOUT_S` for each of at most `MAX_PROBERS` peers. A prober dials only `host:port`
addresses, at most 4 at once, and reports only gRPC's status code of a failed dial.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re

import grpc

from .gen import p2pdiloco_pb2 as pb
from .gen import p2pdiloco_pb2_grpc as pb_grpc

log = logging.getLogger("p2pdiloco.network")

PING_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = PING_TIMEOUT_S + 3.0
MAX_PROBERS = 2
RETRY_AFTER_S = 1.0  # network.py asks a second time, after this, before it gives up on gRPC


# What a peer may be asked to dial: host:port and nothing else (no unix: sockets, no dns:/// or
# other gRPC target schemes), so a caller cannot point a peer at arbitrary local endpoints.
_HOST_PORT = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")
_DIALS = asyncio.Semaphore(4)  # probes dialled at once by one peer; more wait their turn


def dial(address: str, trust=None) -> grpc.aio.Channel:
    """A fresh channel to `address`: mutual TLS with the run's CA in a closed run (trust.py)."""
    if trust is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, trust.grpc_channel_credentials(), options=trust.grpc_channel_options())


async def answer(identity, request: pb.ProbeRequest, trust=None) -> pb.ProbeReply:
    """The prober's side (the caller's identity is already checked). An empty address is a ping.
    A failed dial reports only gRPC's status code, not its details."""
    if not request.address:
        return pb.ProbeReply(reachable=True, detail=identity.peer_id)
    m = _HOST_PORT.match(request.address)
    if not m or not 0 < int(m.group(1)) < 65536:
        return pb.ProbeReply(reachable=False, detail="not a host:port address")
    async with _DIALS:
        channel = dial(request.address, trust)
        try:
            ping = pb.ProbeRequest(caller=identity.caller())
            reply = await pb_grpc.AveragingStub(channel).Probe(ping, timeout=PING_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return pb.ProbeReply(reachable=False, detail=f"dialling it failed ({exc.code().name})")
        except Exception as exc:  # grpc refuses some addresses with ValueError or the like
            return pb.ProbeReply(reachable=False, detail=f"dialling it failed ({type(exc).__name__})")
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
    reasons, refused = [], False
    for rec in random.sample(others, min(MAX_PROBERS, len(others))):
        who = rec.peer_id[-8:]
        request = pb.ProbeRequest(caller=identity.caller(), address=address)
        try:
            reply = await asyncio.wait_for(channels.stub(rec.address).Probe(request, timeout=PROBE_TIMEOUT_S),
                                           PROBE_TIMEOUT_S + 1)
        except Exception as exc:  # an older peer (UNIMPLEMENTED), a dead one, a timeout: ask the next
            detail = exc.details() if hasattr(exc, "details") else repr(exc)
            reasons.append(f"peer {who} gave no answer: {detail}")
            continue
        if reply.reachable:
            return True, f"peer {who} reached it"
        # One prober may be the one that cannot dial out: ask the next before giving up on gRPC.
        refused = True
        reasons.append(f"peer {who}: {reply.detail}")
    return (False if refused else None), "; ".join(reasons)

"""Group formation for one average: who averages fragment f of round r with whom.

Every peer due for (f, r) declares itself in the DHT under the round's key, stamped with the DHT
time it declared at. The round's window closes `window_s` after the *first* declaration, the same
moment for every peer: a declaration stamped after that is late, and every peer leaves it out
(the late peer itself sees it at once and sits the round out, logged, instead of waiting). A peer
returns its group as soon as every live training peer of the run has declared within the window,
or else once the window has closed and `SETTLE_S` more have passed for declarations stored just
before the close to become readable. Without a shared close, a peer that declared as a fast peer's
own window ended was in some peers' view of the group and not in others', and the round failed
for all of them.

From the declared set, groups are a pure, deterministic function (`partition`): members are
ordered by a hash of the round and their peer id and cut into groups of at most `group_size`, so a
swarm larger than a group regroups at random every round and averages mix across the whole swarm
without a global barrier. Peers that read the same set compute the same groups; a peer that read
a different set (a declaration slower to store than SETTLE_S, clocks further apart than that)
carries a different `group_id`, and the owners refuse its parts (that round is then skipped for
it, logged). That also happens when peers return early on different views of who is live (a
newcomer some peers already list and others do not): the shared close makes the late case
consistent, not that one. The stamps are DHT time (the wall clock): peers' clocks must agree to
well under SETTLE_S, as NTP keeps them.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from ..averaging import SyncKey


@dataclass(frozen=True)
class Member:
    peer_id: str
    address: str  # host:port of its data plane


@dataclass(frozen=True)
class Group:
    key: SyncKey
    members: tuple[Member, ...]  # in span order: member i owns span i
    group_id: bytes
    my_index: int
    waited_s: float = 0.0

    @property
    def size(self) -> int:
        return len(self.members)


def round_key(key: SyncKey) -> str:
    return f"round/{key.kind}/{key.index}/{key.round}"


def partition(peer_ids: list[str], group_size: int, seed: str) -> list[list[str]]:
    """Cut the declared peers into ⌈n / group_size⌉ groups of near-equal size, in an order that
    changes every round (seed) but is the same on every peer."""
    order = sorted(peer_ids, key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).digest())
    n_groups = max(1, -(-len(order) // group_size))
    return [sorted(order[g::n_groups]) for g in range(n_groups)]


def group_id(key: SyncKey, members: list[str]) -> bytes:
    text = f"{key.kind}/{key.index}/{key.round}|" + ",".join(members)
    return hashlib.sha256(text.encode()).digest()[:16]


def make_group(key: SyncKey, declared: dict[str, str], me: str, group_size: int, waited_s: float = 0.0) -> Group:
    for ids in partition(list(declared), group_size, seed=round_key(key)):
        if me in ids:
            members = tuple(Member(p, declared[p]) for p in ids)
            return Group(key, members, group_id(key, ids), ids.index(me), waited_s)
    raise AssertionError(f"{me} is not among the declared peers")


class LateForRound(RuntimeError):
    """This peer declared after the round's window had closed: the others average without it."""


# After the window closes, how long a declaration stamped before the close may take to become
# readable (a DHT store takes ~0.1 s on a 25 ms link, bench wan's matchmaking floor).
SETTLE_S = 1.0


# Declarations stamped this long before mine are not of this round: a run restarted under the same
# run id within the entries' TTL, or a peer whose clock is far behind. Were they counted, they
# would close the window for every peer at once.
STALE_S = 60.0


def on_time(declarations: dict[str, tuple[str, float]], window_s: float,
            mine: float | None = None) -> tuple[dict[str, str], float]:
    """The declarations stamped within `window_s` of the first one (peer id → address), and when
    that window closes; stamps more than STALE_S before `mine` do not count."""
    if mine is not None:
        declarations = {p: d for p, d in declarations.items() if d[1] >= mine - STALE_S}
    closes = min(at for _, at in declarations.values()) + window_s
    return {p: address for p, (address, at) in declarations.items() if at <= closes}, closes


# The DHT reads a second that the peers of one round make together, at most, once they have
# backed off: each waits peers / POLL_READS_PER_S seconds between reads (capped at 1 s).
POLL_READS_PER_S = 40.0


def poll_share_s(peers: int) -> float:
    return min(1.0, peers / POLL_READS_PER_S)


async def form_group(control, key: SyncKey, me: Member, expected, group_size: int, window_s: float,
                     poll_s: float = 0.05, ttl_s: float = 120.0, clock=None, excluded=frozenset) -> Group:
    """Declare myself for `key` and return my group once every expected peer has declared in the
    window, or the window has closed (see above). `expected()` gives the peer ids of live training
    peers (a blocking DHT read); `excluded()` the peers that most others refuse (network.py), whose
    declarations do not count. Every DHT call runs in the loop's executor; none blocks the data
    plane. Raises LateForRound if this peer's declaration came after the window closed."""
    from .control import dht_time
    clock = clock or dht_time
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    rkey = round_key(key)
    # Declaring and listing the live peers are independent DHT round trips: on a high-RTT path,
    # one after the other cost a round trip of the critical path (docs/wan.md).
    mine, live = await asyncio.gather(loop.run_in_executor(None, control.declare, rkey, me.address, ttl_s),
                                      loop.run_in_executor(None, expected))
    want = set(live) | {me.peer_id}
    looked = time.monotonic()
    wait = poll_s
    while True:
        declarations = await loop.run_in_executor(None, control.declarations, rkey, ttl_s)
        declarations[me.peer_id] = (me.address, mine)  # my own store may not be readable yet
        out = excluded()  # nor do an excluded peer's declarations close the window
        timely, closes = on_time({p: d for p, d in declarations.items() if p == me.peer_id or p not in out},
                                 window_s, mine)
        if mine > closes:
            raise LateForRound(f"{key.kind} {key.index} round {key.round}: declared {mine - closes:.2f}s after its "
                               f"window closed ({window_s:.0f}s after the first peer); the others average without me")
        if want <= set(timely) or clock() >= closes + SETTLE_S:
            return make_group(key, timely, me.peer_id, group_size, time.monotonic() - start)
        # Every peer of the round polls the DHT: back off to a wait that grows with the swarm, so
        # the round's peers make about POLL_READS_PER_S reads a second in all, not 20 each (at 32
        # peers on 2 cores, 20 reads a second each starved the DHT and the heartbeats with it).
        await asyncio.sleep(wait)
        wait = min(2 * wait, max(poll_s, poll_share_s(len(want))))
        if time.monotonic() - looked > 1.0:  # peers that died since we looked stop being expected
            want = set(await loop.run_in_executor(None, expected)) | {me.peer_id}  # (a read of every record:
            looked = time.monotonic()                                               # once a second, not per poll)

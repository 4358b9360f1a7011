"""Group formation for one average: who averages fragment f of round r with whom.

Every peer due for (f, r) declares itself in the DHT under the round's key, then polls that key
until every live training peer of the run has declared, or until the matchmaking window closes
(`window_s`, the bound on how long a fast peer waits for a slow one). From the declared set, groups
are a pure, deterministic function (`partition`): members are ordered by a hash of the round and
their peer id and cut into groups of at most `group_size`, so a swarm larger than a group regroups
at random every round and averages mix across the whole swarm without a global barrier. Peers that
read the same declared set compute the same groups; a peer that read a different set carries a
different `group_id`, and the owners refuse its parts (that round is then skipped for it, logged).
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


async def form_group(control, key: SyncKey, me: Member, expected, group_size: int, window_s: float,
                     poll_s: float = 0.05, ttl_s: float = 120.0) -> Group:
    """Declare myself for `key` and return my group once every expected peer has declared or the
    window has closed. `expected()` gives the peer ids of live training peers (a blocking DHT read).
    Every DHT call runs in the loop's executor; none blocks the data plane."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    rkey = round_key(key)
    await loop.run_in_executor(None, control.declare, rkey, me.address, ttl_s)
    want = set(await loop.run_in_executor(None, expected)) | {me.peer_id}
    declared: dict[str, str] = {}
    while True:
        declared = await loop.run_in_executor(None, control.declared, rkey)
        declared[me.peer_id] = me.address
        waited = time.monotonic() - start
        if want <= set(declared) or waited >= window_s:
            return make_group(key, declared, me.peer_id, group_size, waited)
        await asyncio.sleep(poll_s)
        if waited > 1.0:  # peers that died since we looked stop being expected
            want = set(await loop.run_in_executor(None, expected)) | {me.peer_id}

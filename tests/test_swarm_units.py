"""Pure pieces of the swarm: peer records, group partition, config validation, the proto's code."""
from __future__ import annotations

import filecmp
import time
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdiloco.averaging import SyncKey
from p2pdiloco.swarm.config import SwarmConfig
from p2pdiloco.swarm.matchmaking import (SETTLE_S, LateForRound, Member, form_group, group_id, make_group, on_time,
                                         partition)
from p2pdiloco.simulate import SimConfig
from p2pdiloco.swarm.records import PeerRecord, RecordError, config_hash, shared_config

ROOT = Path(__file__).resolve().parent.parent


def record(**over) -> dict:
    cfg = SimConfig()
    base = PeerRecord("12D3KooA", "127.0.0.1:4000", ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooA"], 1, config_hash(cfg),
                      "model=tiny", "training", step=5, tokens=100, tokens_per_s=3.5, rounds={"0": 2},
                      run_config=shared_config(cfg)).to_dict()
    base.update(over)
    return base


def test_record_round_trip_ignores_fields_of_newer_versions():
    rec = PeerRecord.from_dict(record(gpu="H200", future_field=[1, 2]))
    assert rec.peer_id == "12D3KooA" and rec.rounds == {"0": 2}


@pytest.mark.parametrize("bad", [
    {"state": "dancing"}, {"step": -1}, {"step": "5"}, {"address": "nohost"}, {"maddrs": "x"},
    {"tokens_per_s": float("nan")}, {"rounds": {"0": "x"}}, {"peer_id": 7},
    {"run_config": "model=tiny"}, {"config_hash": "0" * 16}, {"config": "x" * 5000},
])
def test_malformed_records_are_refused(bad):
    with pytest.raises(RecordError):
        PeerRecord.from_dict(record(**bad))


def test_a_record_without_a_required_field_is_refused():
    for name in ("config_hash", "run_config"):
        raw = record()
        del raw[name]
        with pytest.raises(RecordError, match=name):
            PeerRecord.from_dict(raw)
    with pytest.raises(RecordError):
        PeerRecord.from_dict(["not", "a", "mapping"])


@given(st.sets(st.text("abcdef0123456789", min_size=4, max_size=8), min_size=1, max_size=40),
       st.integers(2, 9), st.integers(0, 1000))
def test_partition_covers_every_peer_once_in_balanced_groups(peers, size, rnd):
    groups = partition(sorted(peers), size, seed=f"round/fragment/0/{rnd}")
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(peers)
    assert all(len(g) <= size for g in groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert partition(list(reversed(sorted(peers))), size, seed=f"round/fragment/0/{rnd}") == groups


def test_groups_change_between_rounds_and_agree_between_peers():
    peers = [f"peer{i:02d}" for i in range(12)]
    a = partition(peers, 4, "round/fragment/0/1")
    b = partition(peers, 4, "round/fragment/0/2")
    assert a != b
    declared = {p: f"127.0.0.1:{4000 + i}" for i, p in enumerate(peers)}
    key = SyncKey("fragment", 0, 1)
    groups = {p: make_group(key, declared, p, 4) for p in peers}
    for p, g in groups.items():
        assert g.members[g.my_index].peer_id == p
        for m in g.members:  # every member of my group computed the same group
            assert groups[m.peer_id].group_id == g.group_id
    assert group_id(key, ["a", "b"]) != group_id(SyncKey("fragment", 0, 2), ["a", "b"])


def test_the_window_closes_after_the_first_declaration_for_everyone():
    decl = {"a": ("h:1", 100.0), "b": ("h:2", 103.0), "c": ("h:3", 105.0), "d": ("h:4", 105.01)}
    timely, closes = on_time(decl, 5.0)
    assert closes == 105.0 and timely == {"a": "h:1", "b": "h:2", "c": "h:3"}
    assert on_time({"d": ("h:4", 105.01)}, 5.0)[0] == {"d": "h:4"}  # alone, d opens its own window
    # a stale declaration (a run restarted under the same id) does not close the window for all
    stale = {"old": ("h:9", 100.0 - 300), **decl}
    assert on_time(stale, 5.0, mine=103.0) == (timely, closes)


class _SharedRound:
    """The round keys of a DHT, shared by the peers of one test; each peer reads it through `View`."""

    def __init__(self):
        self.entries: dict[str, dict[str, tuple[str, float]]] = {}

    class View:
        def __init__(self, shared, peer_id):
            self.shared, self.peer_id = shared, peer_id

        def declare(self, key, value, ttl_s):
            at = time.time()
            self.shared.entries.setdefault(key, {})[self.peer_id] = (value, at)
            return at

        def declarations(self, key, ttl_s):
            return dict(self.shared.entries.get(key, {}))


def test_a_peer_that_declares_after_the_window_is_left_out_by_all_and_knows_it_at_once():
    """Three live peers; the third declares after the round's window closed (a slow peer). The two
    others must agree on a group without it, and it must not wait: before the shared close, the
    fast peers' windows ended at different moments and a declaration in between split them."""
    import asyncio
    import time

    shared, key, window = _SharedRound(), SyncKey("fragment", 0, 3), 0.4
    members = {p: Member(p, f"h:{i}") for i, p in enumerate(["fast1", "fast2", "slow"])}

    async def join(peer, delay):
        await asyncio.sleep(delay)
        started = time.monotonic()
        try:
            group = await form_group(_SharedRound.View(shared, peer), key, members[peer], lambda: list(members), 4,
                                     window, poll_s=0.01, clock=time.time)
            return group, time.monotonic() - started
        except LateForRound as exc:
            return exc, time.monotonic() - started

    async def main():
        return await asyncio.gather(join("fast1", 0.0), join("fast2", 0.2), join("slow", window + 0.2))

    (g1, _), (g2, _), (late, late_s) = asyncio.run(main())
    assert [m.peer_id for m in g1.members] == [m.peer_id for m in g2.members] == ["fast1", "fast2"]
    assert g1.group_id == g2.group_id
    assert isinstance(late, LateForRound) and late_s < 0.2 < SETTLE_S


def test_peers_that_all_declare_in_the_window_form_their_group_without_waiting_for_it_to_close():
    import asyncio
    import time

    shared, key = _SharedRound(), SyncKey("fragment", 1, 0)
    members = {p: Member(p, f"h:{i}") for i, p in enumerate(["a", "b"])}

    async def join(peer):
        return await form_group(_SharedRound.View(shared, peer), key, members[peer], lambda: list(members), 4,
                                30.0, poll_s=0.01, clock=time.time)

    async def main():
        return await asyncio.wait_for(asyncio.gather(join("a"), join("b")), 5)

    ga, gb = asyncio.run(main())
    assert ga.group_id == gb.group_id and ga.size == 2


@pytest.mark.parametrize("field,value,match", [
    ("run_id", "has space", "run_id"),
    ("initial_peers", ("127.0.0.1:4000",), "multiaddress"),
    ("transport", "carrier-pigeon", "transport"),
    ("port", 70000, "port"),
    ("reduce_timeout_s", 0.0, "reduce_timeout_s"),
    ("record_ttl_s", 1.0, "record_ttl_s"),
    ("shard", 9, "shard"),
])
def test_swarm_config_errors_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SwarmConfig(**{field: value}).validate(workers=4)


def test_generated_proto_code_is_in_step_with_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    script = ROOT / "scripts" / "gen_proto"
    subprocess.run([str(script), str(tmp_path)], check=True, cwd=ROOT, timeout=120)
    committed = ROOT / "p2pdiloco" / "swarm" / "gen"
    for name in ("p2pdiloco_pb2.py", "p2pdiloco_pb2_grpc.py", "p2pdiloco_pb2.pyi"):
        assert filecmp.cmp(committed / name, tmp_path / name, shallow=False), (
            f"{name} is out of step with proto/p2pdiloco.proto: run scripts/gen_proto")


# ---- the data plane's Reduce wire format (dataplane.py): protobuf's messages, payload copied once
def _request(payload: bytes = b""):
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb

    return pb.ReduceRequest(caller=pb.Caller(run_id="r", protocol=3, config_hash="h", peer_id="p"), kind="fragment",
                            index=2, round=10**12, group_id=b"\x00g", weight=123.5, payload=payload)


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8", "e3m0", "e3m0-huffman"])
@pytest.mark.parametrize("numel", [0, 1, 1000, 4099])
def test_reduce_messages_are_protobufs_and_payloads_round_trip(codec, numel):
    import torch

    from p2pdiloco.codecs import get_codec
    from p2pdiloco.swarm import wire as dp
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb

    enc = get_codec(codec).encode(torch.randn(numel))
    pieces = enc.pieces()
    assert b"".join(pieces) == enc.to_bytes()
    # A request is byte for byte what protobuf writes (payload is its last field) ...
    wire = b"".join(dp.with_payload(_request().SerializeToString(), dp.REQUEST_PAYLOAD, pieces))
    assert wire == _request(enc.to_bytes()).SerializeToString()
    head, payload = dp.split_payload(wire, dp.REQUEST_PAYLOAD, pb.ReduceRequest)
    assert head == _request() and bytes(payload) == enc.to_bytes()
    # ... and a reply is a message protobuf reads as the same (its payload comes last here).
    reply = pb.ReduceReply(participants=["a", "b"], total_weight=7.0)
    wire = b"".join(dp.with_payload(reply.SerializeToString(), dp.REPLY_PAYLOAD, pieces))
    assert pb.ReduceReply.FromString(wire) == pb.ReduceReply(payload=enc.to_bytes(), participants=["a", "b"],
                                                             total_weight=7.0)
    head, payload = dp.split_payload(pb.ReduceReply.FromString(wire).SerializeToString(), dp.REPLY_PAYLOAD,
                                     pb.ReduceReply)
    assert head == reply and bytes(payload) == enc.to_bytes()
    ours = dp.parse_payload(payload)
    assert ours.codec is enc.codec and ours.numel == numel and torch.equal(ours.decode(), enc.decode())


def test_split_payload_agrees_with_protobuf_on_repeats_and_unknown_fields():
    from p2pdiloco.swarm import wire as dp
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb

    # The payload field twice (the last one wins) and an unknown field 99 (kept), as protobuf parses them.
    wire = (_request(b"first").SerializeToString() + b"\x3a\x06second" + bytes([0x98, 0x06, 0x05]) +
            b"\x18\x01")  # index = 1 after the fact: the last scalar wins too
    head, payload = dp.split_payload(wire, dp.REQUEST_PAYLOAD, pb.ReduceRequest)
    theirs = pb.ReduceRequest.FromString(wire)
    assert bytes(payload) == theirs.payload == b"second" and head.index == theirs.index == 1
    theirs.payload = b""
    assert head == theirs and head.SerializeToString() == theirs.SerializeToString()


@pytest.mark.parametrize("wire", [b"\x3a\x05abc", b"\x3a", b"\x0a\xff", b"\x09\x00\x00", b"\x0b", b"\xff" * 11])
def test_split_payload_refuses_malformed_messages(wire):
    from google.protobuf.message import DecodeError

    from p2pdiloco.swarm import wire as dp
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb

    with pytest.raises(DecodeError):
        dp.split_payload(wire, dp.REQUEST_PAYLOAD, pb.ReduceRequest)


def test_parse_payload_checks_like_codecs_from_bytes():
    import torch

    from p2pdiloco.codecs import CodecError, from_bytes, get_codec
    from p2pdiloco.swarm import wire as dp

    good = get_codec("e3m0").encode(torch.randn(3000)).to_bytes()
    bad = [b"", b"\x01\x00", b"\x07garbage", b"\x05\x03" + good[2:], good[:-1], good + b"\x00",
           get_codec("fp32").encode(torch.randn(8)).to_bytes()[:-4]]
    for payload in bad:
        with pytest.raises(CodecError) as theirs:
            from_bytes(payload)
        with pytest.raises(CodecError) as ours:
            dp.parse_payload(memoryview(payload))
        assert str(ours.value) == str(theirs.value)


def test_all_finite_sees_nan_and_inf():
    import torch

    from p2pdiloco.swarm.dataplane import all_finite

    x = torch.randn(10000)
    assert all_finite(x) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1234] = bad
        assert not all_finite(y)

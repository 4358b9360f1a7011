"""Pure pieces of the swarm: peer records, group partition, config validation, the proto's code."""
from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdiloco.averaging import SyncKey
from p2pdiloco.swarm.config import SwarmConfig
from p2pdiloco.swarm.matchmaking import group_id, make_group, partition
from p2pdiloco.swarm.records import PeerRecord, RecordError

ROOT = Path(__file__).resolve().parent.parent


def record(**over) -> dict:
    base = PeerRecord("12D3KooA", "127.0.0.1:4000", ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooA"], 1, "abc", "model=tiny",
                      "training", step=5, tokens=100, tokens_per_s=3.5, rounds={"0": 2}).to_dict()
    base.update(over)
    return base


def test_record_round_trip_ignores_fields_of_newer_versions():
    rec = PeerRecord.from_dict(record(gpu="H200", future_field=[1, 2]))
    assert rec.peer_id == "12D3KooA" and rec.rounds == {"0": 2}


@pytest.mark.parametrize("bad", [
    {"state": "dancing"}, {"step": -1}, {"step": "5"}, {"address": "nohost"}, {"maddrs": "x"},
    {"tokens_per_s": float("nan")}, {"rounds": {"0": "x"}}, {"peer_id": 7},
])
def test_malformed_records_are_refused(bad):
    with pytest.raises(RecordError):
        PeerRecord.from_dict(record(**bad))


def test_a_record_without_a_required_field_is_refused():
    raw = record()
    del raw["config_hash"]
    with pytest.raises(RecordError, match="config_hash"):
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

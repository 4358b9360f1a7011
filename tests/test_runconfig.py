"""The run's config travels in the peer records (records.py) and a newcomer adopts it (runconfig.py):
pure pieces, no processes. The real join is in test_swarm_join_leave.py."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest

from p2pdiloco.outer import OuterConfig
from p2pdiloco.simulate import SimConfig
from p2pdiloco.streaming import StreamingConfig
from p2pdiloco.swarm.records import (LOCAL_FIELDS, PeerRecord, RecordError, config_hash,
                                     describe_config, shared_config, shared_hash)
from p2pdiloco.swarm.runconfig import ConfigMismatch, adopt, choose_run, differences, given_names

RUN = SimConfig(model="micro", steps=40, streaming=StreamingConfig(H=20, fragments=2, codec="fp16"),
                outer=OuterConfig(lr=0.5, momentum=0.8))


def record(cfg: SimConfig = RUN, peer_id: str = "12D3KooA", state: str = "training", **over) -> PeerRecord:
    raw = PeerRecord(peer_id, "127.0.0.1:4000", [f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"], 3, config_hash(cfg),
                     describe_config(cfg), state, run_config=shared_config(cfg)).to_dict()
    raw.update(over)
    return PeerRecord.from_dict(raw)


def test_shared_config_holds_every_field_but_the_local_ones():
    """Generic: a field added to a config dataclass later is shared (and hashed) without a change here."""
    shared = shared_config(SimConfig())
    for f in dataclasses.fields(SimConfig):
        value = getattr(SimConfig(), f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                local = f.name in LOCAL_FIELDS or f"{f.name}.{g.name}" in LOCAL_FIELDS
                assert (g.name in shared.get(f.name, {})) != local, f"{f.name}.{g.name}"
        else:
            assert (f.name in shared) != (f.name in LOCAL_FIELDS), f.name
    assert "inner" not in shared and "tau" not in shared["streaming"] and "paths" not in shared["data"]


def test_the_hash_covers_shared_fields_and_ignores_local_ones():
    base = config_hash(RUN)
    assert config_hash(replace(RUN, batch_size=3, streaming=replace(RUN.streaming, tau=2, alpha=0.0))) == base
    assert config_hash(replace(RUN, seed=1)) != base  # every peer builds the initial model from the seed
    assert config_hash(replace(RUN, streaming=replace(RUN.streaming, dp_warmup_steps=5))) != base


def test_a_newcomer_given_nothing_adopts_the_run_and_keeps_its_local_choices():
    mine = adopt({"batch_size": 4, "streaming": {"tau": 2}, "inner": {"lr": 1e-3}}, SimConfig(), record(), "r")
    assert config_hash(mine) == config_hash(RUN)
    assert (mine.model, mine.steps, mine.streaming.H, mine.streaming.fragments, mine.outer.lr) == ("micro", 40, 20, 2, 0.5)
    assert (mine.batch_size, mine.streaming.tau, mine.inner.lr) == (4, 2, 1e-3)
    assert given_names({"batch_size": 4, "model": "micro"}, mine) == ["model"]


def test_options_that_agree_with_the_run_join_and_conflicting_ones_are_refused_naming_both():
    assert config_hash(adopt({"model": "micro", "streaming": {"H": 20}}, SimConfig(), record(), "r")) == config_hash(RUN)
    with pytest.raises(ConfigMismatch) as err:
        adopt({"streaming": {"fragments": 1}}, SimConfig(), record(), "r")
    msg = str(err.value)
    assert "run 'r' trains model=micro" in msg and "fragments=2" in msg and "fragments=1" in msg
    assert "streaming.fragments: run 2, here 1" in msg
    with pytest.raises(ConfigMismatch):  # None: everything of cfg counts as given (a programmatic caller)
        adopt(None, SimConfig(), record(), "r")


def test_a_run_config_of_a_newer_version_is_refused_with_what_to_do():
    newer = dict(shared_config(RUN), hyperdrive=True)
    rec = record(run_config=newer, config_hash=shared_hash(newer))
    with pytest.raises(ConfigMismatch, match="unknown field 'hyperdrive'.*upgrade"):
        adopt({}, SimConfig(), rec, "r")


@pytest.mark.parametrize("bad", [
    "model=micro",  # not a mapping
    {"model": "x" * 300},  # an oversized string
    {"steps": float("inf")},
    {"outer": {"lr": {"deep": 1}}},  # nested too deep
    {"data": {"paths": list(range(100))}},  # a long list
    {"model": object()},
    {"pad": ["y" * 200] * 50},  # over the size bound
])
def test_a_malformed_or_oversized_run_config_is_refused(bad):
    try:  # the right hash where there is one: the shape alone must be refused
        claimed = shared_hash(bad)
    except (TypeError, AttributeError):
        claimed = "0" * 16
    with pytest.raises(RecordError, match="run_config"):
        record(run_config=bad, config_hash=claimed)


def test_a_run_config_that_does_not_hash_to_the_records_hash_is_refused():
    """What a newcomer adopts is exactly what the run's peers check each other's calls against."""
    forged = dict(shared_config(RUN), steps=10**9)
    with pytest.raises(RecordError, match="does not hash"):
        record(run_config=forged)


def test_the_run_is_the_config_of_the_most_training_peers_whatever_the_order():
    other = replace(RUN, steps=7)
    recs = [record(RUN, "12D3KooA"), record(other, "12D3KooB"), record(other, "12D3KooC", state="joining"),
            record(RUN, "12D3KooD")]
    assert choose_run(recs).peer_id == "12D3KooA"
    assert choose_run(list(reversed(recs))).peer_id == "12D3KooA"
    assert choose_run([]) is None
    assert differences(shared_config(RUN), shared_config(other)) == "steps: run 40, here 7"

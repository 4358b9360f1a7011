"""Trust between peers: donors cross-checked (state.agreed), and an adversarial peer in a real swarm."""
import io
import json
import math

import pytest
import torch

from p2pdiloco.averaging import InProcessAverager
from p2pdiloco.inner import InnerConfig, InnerOptimizer
from p2pdiloco.model import Transformer, model_config
from p2pdiloco.outer import OuterConfig
from p2pdiloco.streaming import StreamingConfig, Worker
from p2pdiloco.swarm.state import StateError, agreed, fingerprint, snapshot

from peers import TINY


def _worker(seed: int = 0) -> Worker:
    torch.manual_seed(seed)
    model = Transformer(model_config("micro"))
    return Worker("w", model, InnerOptimizer(model, InnerConfig(), 10), StreamingConfig(H=20, fragments=2),
                  OuterConfig(), InProcessAverager(["w"]).member("w"))


def _lying(blob: bytes) -> bytes:
    state = torch.load(io.BytesIO(blob), weights_only=True)
    state["global"][0] = state["global"][0] + 1.0
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_a_donor_that_disagrees_with_the_others_is_outvoted():
    w = _worker()
    honest = snapshot(w)
    w.step = 7  # a replica's own counters and inner moments are not compared
    other = snapshot(w)
    who, blob, agreeing = agreed({"honest-a": honest, "liar": _lying(honest), "honest-b": other})
    assert who in ("honest-a", "honest-b") and agreeing == 2
    assert fingerprint(blob) == fingerprint(honest) != fingerprint(_lying(honest))


def test_donors_that_all_differ_are_refused():
    honest = snapshot(_worker())
    with pytest.raises(StateError, match="all differ"):
        agreed({"a": honest, "b": _lying(honest)})


def test_a_corrupt_donor_blob_is_a_state_error():
    with pytest.raises(StateError, match="does not load"):
        fingerprint(b"not a torch file")


def test_fingerprint_of_some_fragments_only_compares_those():
    w = _worker()
    blob = snapshot(w, {1})
    assert [f for f, _, _ in fingerprint(blob)] == [1]
    assert fingerprint(snapshot(w), {1}) == fingerprint(blob)


@pytest.mark.timeout(420)
def test_an_adversarial_peer_does_not_poison_the_honest_peers(swarm):
    """Three honest peers and one that sets every E3M0 block exponent of its parts to the largest
    (before robust aggregation every honest peer ended at NaN): the honest peers end finite, well
    below the initial loss, with one global model, and they did average (with the adversary clipped)."""
    args = [*TINY, "--steps", "48", "--wait-for-peers", "4", "--json", "summary.json"]
    peers = swarm.start_run(3, *args)
    peers.append(swarm.start(*args, "--initial-peers", peers[0].join_address(), "--adversary", "extreme-scales"))
    for p in peers:
        assert p.wait(300) == 0, p.output()[-3000:]
    summaries = [json.loads((p.cwd / "summary.json").read_text()) for p in peers]
    honest = summaries[:3]
    losses = [s["eval_loss"] for s in honest]
    assert all(math.isfinite(x) for x in losses)
    assert max(losses) < 0.8 * honest[0]["eval_loss_initial"], losses
    assert len({round(x, 6) for x in losses}) == 1, losses  # one global model
    assert sum(s["group_sizes"].get("4", 0) for s in honest) > 0  # the rounds did happen, adversary included


def _rec(peer: str, refused=()):
    from p2pdiloco.swarm.records import PeerRecord
    return PeerRecord(peer, "127.0.0.1:1", [], 3, "h", "c", "training", refused=list(refused))


def test_a_peer_most_others_refuse_is_left_out_and_one_liar_cannot_exclude_anyone():
    from p2pdiloco.swarm.network import excluded
    honest = ["a", "b", "c"]
    records = [_rec(p, ["evil"]) for p in honest] + [_rec("evil", ["a"])]
    assert excluded(records, "a") == {"evil"}
    assert excluded([_rec("a", ["evil"]), _rec("b"), _rec("c"), _rec("evil", ["a"])], "a") == set()  # 1 of 3
    assert excluded([_rec("a", ["b"]), _rec("b")], "a") == {"b"}  # a pair: my own judgment


def test_a_record_with_a_malformed_refused_list_is_refused():
    from p2pdiloco.swarm.records import PeerRecord, RecordError
    raw = _rec("a").to_dict()
    for bad in ("evil", [1], ["x" * 200], ["p"] * 1000):
        with pytest.raises(RecordError, match="refused"):
            PeerRecord.from_dict({**raw, "refused": bad})

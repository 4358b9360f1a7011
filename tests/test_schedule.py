"""Fragments (placement rule) and the sync schedule."""
import pytest
import torch

from p2pdiloco.fragments import FlatView, build_fragments, due_fragments, next_round, sync_offsets, sync_round
from p2pdiloco.model import Transformer, model_config


@pytest.fixture(scope="module")
def model():
    return Transformer(model_config("tiny", n_layers=6))


def _blocks_of(fragment):
    return sorted({int(n.split(".")[1]) for n in fragment.param_names if n.startswith("blocks.")})


def test_strided_and_sequential(model):
    strided = build_fragments(model, 6, 3, "strided")
    assert [_blocks_of(f) for f in strided[:3]] == [[0, 3], [1, 4], [2, 5]]
    sequential = build_fragments(model, 6, 3, "sequential")
    assert [_blocks_of(f) for f in sequential[:3]] == [[0, 1], [2, 3], [4, 5]]


def test_every_parameter_in_exactly_one_fragment(model):
    names = [n for n, _ in model.named_parameters()]
    for p in (1, 2, 3, 6):
        fragments = build_fragments(model, 6, p)
        placed = [n for f in fragments for n in f.param_names]
        assert sorted(placed) == sorted(names)
        assert sum(f.numel for f in fragments) == model.num_parameters()


def test_shared_fragment_rule(model):
    # P = 1: one fragment with everything (plain DiLoCo). P > 1: embeddings and norm on their own.
    assert len(build_fragments(model, 6, 1)) == 1
    fragments = build_fragments(model, 6, 3)
    assert [f.name for f in fragments] == ["blocks0", "blocks1", "blocks2", "shared"]
    assert set(fragments[-1].param_names) == {"embed.weight", "norm.weight"}
    total = model.num_parameters()
    assert max(f.numel for f in fragments) <= total / 3


def test_too_many_fragments(model):
    with pytest.raises(ValueError, match="streaming.fragments .7. must be between 1 and the model's 6 blocks"):
        build_fragments(model, 6, 7)


@pytest.mark.parametrize("F,H", [(1, 10), (3, 30), (5, 100), (4, 7)])
def test_each_fragment_syncs_once_per_H(F, H):
    offsets = sync_offsets(F, H)
    assert offsets[0] == 0 and all(0 <= o < H for o in offsets) and offsets == sorted(offsets)
    T = 5 * H
    seen = {f: [] for f in range(F)}
    for t in range(1, T + 1):
        for f in due_fragments(t, offsets, H):
            seen[f].append(t)
    for f, steps in seen.items():
        assert all((t - offsets[f]) % H == 0 for t in steps)
        assert all(b - a == H for a, b in zip(steps, steps[1:]))
        assert [sync_round(t, offsets[f], H) for t in steps] == list(range(len(steps)))
        assert len(steps) in (T // H, T // H + 1)
        for t in range(0, T):  # the round after any step is the next regular sync's round
            following = [s for s in steps if s > t]
            if following:
                assert next_round(t, offsets[f], H) == sync_round(following[0], offsets[f], H)


def test_flat_view_roundtrip(model):
    fragment = build_fragments(model, 6, 2)[1]
    view = FlatView(model, fragment)
    flat = view.read()
    assert flat.numel() == fragment.numel
    view.write(flat * 0 + 1.5)
    assert all(torch.all(p == 1.5) for p in view.params)
    view.write(flat)
    assert torch.equal(view.read(), flat)

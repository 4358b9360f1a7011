"""Fragments of the model and their sync schedule (Streaming DiLoCo, arXiv 2501.18512 §2.1).

The model's repeated blocks are split into P fragments: strided by default (block i → fragment i mod P,
the paper's choice: each fragment spans the depth of the network), or sequential (contiguous runs).

Placement rule for everything outside the blocks (token embedding, final norm, untied head): with
P = 1 it is part of the single fragment (plain DiLoCo syncs the whole model at once). With P > 1 it
is a fragment of its own, `shared`, index P. Joining it to a block fragment would make that fragment
larger than 1/P of the model, and the point of fragments is that no single sync is. So a run with
P > 1 has P + 1 fragments, all on the same schedule.

The blocks are found generically (`find_blocks`): the `nn.ModuleList` of layers of one type that
holds the most parameters, so `blocks` of the built-in transformer, `transformer.h` of GPT-2,
`model.layers` of Llama or Qwen, or whatever list a user's own model keeps its layers in.

Schedule: fragment f of F syncs after inner step t when t > 0 and (t − t_f) mod H == 0, with offsets
t_f = ⌊f · H / F⌋ spread evenly over [0, H). Its round number is how many syncs it has begun before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Fragment:
    index: int
    name: str
    param_names: tuple[str, ...]
    numel: int


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the model's repeated blocks: of the `nn.ModuleList`s whose items all
    have one type, the one with the most parameters (the first of equals). ValueError if none."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"model {type(model).__name__} has no repeated block list (an nn.ModuleList of layers "
                         f"of one type, with parameters); fragments are cut along such a list: keep the "
                         f"model's layers in one")
    return best


def build_fragments(model: nn.Module, blocks: int, num_fragments: int, strategy: str = "strided") -> list[Fragment]:
    if strategy not in ("strided", "sequential"):
        raise ValueError(f"fragments.strategy '{strategy}' is unknown; use 'strided' or 'sequential'")
    if not 1 <= num_fragments <= blocks:
        raise ValueError(f"streaming.fragments ({num_fragments}) must be between 1 and the model's "
                         f"{blocks} blocks; use fewer fragments or a deeper model")
    per_fragment: list[list[str]] = [[] for _ in range(num_fragments)]
    shared: list[str] = []
    list_name, block_list = find_blocks(model)
    if len(block_list) != blocks:
        raise ValueError(f"the model's block list '{list_name}' has {len(block_list)} blocks, not {blocks}")
    prefix = f"{list_name}." if list_name else ""
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            block = int(name[len(prefix):].split(".")[0])
            if strategy == "strided":
                f = block % num_fragments
            else:
                f = block * num_fragments // blocks
            per_fragment[f].append(name)
        elif num_fragments == 1:
            per_fragment[0].append(name)
        else:
            shared.append(name)
    groups = [(f"blocks{f}", names) for f, names in enumerate(per_fragment)]
    if shared:
        groups.append(("shared", shared))
    params = dict(model.named_parameters())
    return [Fragment(i, label, tuple(names), sum(params[n].numel() for n in names))
            for i, (label, names) in enumerate(groups)]


def sync_offsets(num_fragments: int, H: int) -> list[int]:
    return [f * H // num_fragments for f in range(num_fragments)]


def due_fragments(step: int, offsets: list[int], H: int) -> list[int]:
    """Fragments that begin a sync right after inner step `step` (steps count from 1)."""
    return [f for f, off in enumerate(offsets) if step > 0 and (step - off) % H == 0 and step >= off]


def sync_round(step: int, offset: int, H: int) -> int:
    """The round number of the sync that fragment begins at `step` (0 for its first)."""
    return (step - offset) // H - (1 if offset == 0 else 0)


def next_round(step: int, offset: int, H: int) -> int:
    """The round number of the fragment's first regular sync after `step`."""
    t = step + 1
    t += (offset - t) % H
    return sync_round(max(t, offset if offset > 0 else H), offset, H)


class FlatView:
    """One fragment's parameters seen as a single flat fp32 vector (for Δ, global copy, codecs)."""

    def __init__(self, model: nn.Module, fragment: Fragment):
        params = dict(model.named_parameters())
        self.params = [params[n] for n in fragment.param_names]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def read(self) -> torch.Tensor:
        """A copy of the fragment, on the parameters' device: the global copies, outer state and codec
        work there (streaming.py), and only encoded bytes cross to the host."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def write(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(flat[offset: offset + n].view_as(p))
            offset += n

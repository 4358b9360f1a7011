"""Typed run configuration from a TOML/JSON file and command-line options, validated up front.

A file holds the top-level fields of `SimConfig` and one table per component:

    model = "tiny"
    workers = 4
    [streaming]
    H = 30
    fragments = 2
    [inner]
    lr = 0.002

Options given on the command line override the file. Unknown fields and wrong types are errors
that name the field; values are checked by each component's `validate()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .aggregation import METHODS, AggregateConfig
from .codecs import CODECS
from .data import DataConfig
from .inner import InnerConfig
from .outer import OuterConfig
from .simulate import SimConfig
from .streaming import StreamingConfig

SECTIONS = {"data": DataConfig, "inner": InnerConfig, "outer": OuterConfig, "streaming": StreamingConfig,
            "aggregate": AggregateConfig}

def _tau(value: str) -> int | str:
    """--tau: a number of steps, or 'auto' (streaming.tau_auto)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is neither a number of steps nor 'auto'") from None


# (flag, section or None for top level, field, argparse keywords)
OPTIONS: list[tuple[str, str | None, str, dict]] = [
    ("--model", None, "model", {"help": "a built-in size (tiny, micro, mini, small, base, large, 1b), a built-in "
                                        "Hugging Face config (gpt2-20m, llama-20m, qwen2-20m, gpt2-tiny, llama-tiny), "
                                        "a config.json, a folder of pretrained weights, or module:function"}),
    ("--tokenizer", "data", "tokenizer", {"metavar": "FILE", "help": "a tokenizer.json (Hugging Face tokenizers): "
                                          "text is encoded with it and the model's vocabulary is its (default: bytes)"}),
    ("--workers", None, "workers", {"type": int}),
    ("--steps", None, "steps", {"type": int, "help": "inner steps per worker"}),
    ("--batch-size", None, "batch_size", {"type": int, "help": "sequences per worker per step"}),
    ("--eval-every", None, "eval_every", {"type": int}),
    ("--eval-batches", None, "eval_batches", {"type": int}),
    ("--seed", None, "seed", {"type": int}),
    ("--data", "data", "paths", {"nargs": "+", "metavar": "PATH",
                                 "help": "text files/folders or .npy/.bin token files (default: the stdlib's .py sources)"}),
    ("--seq-len", "data", "seq_len", {"type": int}),
    ("--shards", "data", "shards", {"choices": ["iid", "non_iid"]}),
    ("--mode", "streaming", "mode", {"choices": ["streaming", "data_parallel"]}),
    ("--H", "streaming", "H", {"type": int, "help": "inner steps between syncs of a fragment"}),
    ("--fragments", "streaming", "fragments", {"type": int, "help": "P, fragments of the model's blocks"}),
    ("--strategy", "streaming", "strategy", {"choices": ["strided", "sequential"]}),
    ("--tau", "streaming", "tau", {"type": _tau, "metavar": "STEPS|auto",
                                   "help": "overlap: steps between sending Δ and applying its mean; auto (peers): "
                                           "sized to the measured round latency and step time (overlap.py)"}),
    ("--alpha", "streaming", "alpha", {"type": float, "help": "merge weight of the local replica"}),
    ("--eager", "streaming", "eager", {"action": "store_const", "const": True, "help": "eager updates"}),
    ("--codec", "streaming", "codec", {"choices": list(CODECS),
                                           "help": "what Δ and means travel as (e3m0-huffman: the same "
                                                   "values in ~12%% fewer bytes, for slow links)"}),
    ("--no-error-feedback", "streaming", "error_feedback", {"action": "store_const", "const": False,
                                                           "help": "send each round's Δ without last round's codec error"}),
    ("--dp-warmup-steps", "streaming", "dp_warmup_steps", {"type": int}),
    ("--timeout", "streaming", "timeout_s", {"type": float, "help": "seconds to wait for a late average"}),
    ("--round-seconds", "streaming", "round_s", {"type": float, "help": "time-budget rounds (peers only): each "
                                                "fragment syncs every this many seconds instead of every H steps"}),
    ("--duration", "streaming", "duration_s", {"type": float, "help": "time-budget rounds: seconds of training"}),
    ("--inner-optimizer", "inner", "optimizer", {"choices": ["adamw", "sgd"]}),
    ("--inner-lr", "inner", "lr", {"type": float}),
    ("--warmup-steps", "inner", "warmup_steps", {"type": int}),
    ("--weight-decay", "inner", "weight_decay", {"type": float}),
    ("--grad-clip", "inner", "grad_clip", {"type": float}),
    ("--outer-lr", "outer", "lr", {"type": float}),
    ("--outer-momentum", "outer", "momentum", {"type": float}),
    ("--aggregate", "aggregate", "method", {"choices": list(METHODS), "help": "how a span's owner combines the "
                                            "members' parts (default centered-clip; mean: trusted peers only)"}),
    ("--max-weight-ratio", "aggregate", "max_weight_ratio", {"type": float, "help": "a part's claimed tokens "
                                                             "count as at most this x the median (default 2)"}),
    ("--max-norm-ratio", "aggregate", "max_norm_ratio", {"type": float, "help": "a part's norm is clipped to "
                                                         "this x the median norm (default 2)"}),
    ("--mean-check-ratio", "aggregate", "check_ratio", {"type": float, "help": "refuse a mean whose norm is over "
                                                         "this x this peer's own delta (default 4; 0: no check)"}),
]


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file; options given here override it")
    for flag, _, field, kwargs in OPTIONS:
        parser.add_argument(flag, dest=f"opt_{flag[2:].replace('-', '_')}", default=None, **kwargs)


def read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: '{path}' is not a file")
    try:
        if p.suffix == ".json":
            return json.loads(p.read_text())
        return tomllib.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config: '{path}' is not valid {p.suffix.lstrip('.') or 'TOML'}: {exc}") from exc


def options_to_mapping(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {}
    for flag, section, field, _ in OPTIONS:
        value = getattr(args, f"opt_{flag[2:].replace('-', '_')}")
        if value is not None:
            if flag == "--tau" and value == "auto":  # --tau auto is the field tau_auto
                field, value = "tau_auto", True
            (out.setdefault(section, {}) if section else out)[field] = value
    return out


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(cls, mapping: dict, where: str = ""):
    """Instantiate dataclass `cls` from a mapping, with errors that name the field."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        name = f"{where}{key}"
        if key not in names:
            raise ValueError(f"config: unknown field '{name}'; known fields: {', '.join(sorted(names))}")
        if key in SECTIONS and not where:
            if not isinstance(value, dict):
                raise ValueError(f"config: '{name}' must be a table of fields")
            kwargs[key] = build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def _coerce(hint, value, name):
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config: '{name}' must be a list, got {value!r}")
        inner = get_args(hint)[0]
        return tuple(_coerce(inner, v, name) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"config: '{name}' must be {hint.__name__}, got {value!r}")
    return value


def sim_config(args: argparse.Namespace, defaults: dict | None = None) -> SimConfig:
    mapping = merge(defaults or {}, read_file(args.config) if args.config else {})
    mapping = merge(mapping, options_to_mapping(args))
    seed = mapping.get("seed")
    if seed is not None and "seed" not in mapping.get("data", {}):
        mapping = merge(mapping, {"data": {"seed": seed}})
    return build(SimConfig, mapping).validate()

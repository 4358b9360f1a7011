"""Which model a run trains: `--model` names a built-in size, a Hugging Face causal-LM config, a local
folder of pretrained weights, or a `module:function` that returns any `nn.Module`.

- a built-in size (`tiny`, `micro`, ... model.py): the fast default, byte-level unless a tokenizer is given;
- a built-in Hugging Face config (`gpt2-20m`, `llama-20m`, `qwen2-20m`, and `-tiny` ones for tests,
  `HF_CONFIGS` below), built with `transformers` from the config with random weights;
- a local `config.json` (any causal-LM `model_type` that `transformers` knows): random weights;
- a local folder: with weights (`*.safetensors`, `pytorch_model.bin`) it is loaded with
  `from_pretrained` (local files only: nothing is downloaded); with a `config.json` alone, random weights;
- `module:function` (like `mypkg.models:build`): the function's return value; it gets
  `vocab_size=` if it takes that argument.

Random weights are drawn right after `torch.manual_seed(seed)`, so every peer of a run builds the same
model. Anything that is not the built-in transformer is wrapped in `CausalLM`, which keeps the engine's
call convention: `model(tokens)` gives logits, `model(tokens, targets)` the mean cross-entropy.
Fragments are cut along the model's repeated blocks, found generically (fragments.find_blocks).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import MODEL_SIZES, Transformer, model_config

# Built-in Hugging Face configs: small enough for a CPU; dropout off (replicas should differ by their
# data, not by their dropout masks). Parameter counts with the byte vocabulary (256); an 8k-token
# tokenizer adds 8192 x width (4.2M at width 512).
HF_CONFIGS: dict[str, dict] = {
    "gpt2-tiny": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=512,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),                         # 0.2M
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True),                                              # 0.2M
    "gpt2-20m": dict(model_type="gpt2", n_embd=512, n_layer=6, n_head=8, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),                          # 19.5M
    "llama-20m": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=True),                                               # 19.1M
    "qwen2-20m": dict(model_type="qwen2", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True),                                               # 17.5M
}
BYTE_VOCAB = 256
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _kinds() -> str:
    return (f"a built-in size ({', '.join(MODEL_SIZES)}), a built-in Hugging Face config ({', '.join(HF_CONFIGS)}), "
            f"a config.json file, a folder with config.json (and weights), or module:function")


def model_kind(spec: str) -> str:
    """'builtin', 'hf-name', 'hf-config', 'hf-pretrained' or 'function'; ValueError if none."""
    if spec in MODEL_SIZES:
        return "builtin"
    if spec in HF_CONFIGS:
        return "hf-name"
    p = Path(spec)
    if p.is_file():
        return "hf-config"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"model: folder '{spec}' has no config.json; give a Hugging Face model folder "
                             f"(config.json, and weights for pretrained ones)")
        return "hf-pretrained" if _weight_files(p) else "hf-config"
    if FUNCTION_SPEC.match(spec):
        return "function"
    raise ValueError(f"model '{spec}' is unknown (no such file either); give {_kinds()}")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))


def _hf_config(spec: str, kind: str, vocab_size: int | None):
    from transformers import AutoConfig
    if kind == "hf-name":
        fields = dict(HF_CONFIGS[spec], vocab_size=BYTE_VOCAB)
    else:
        path = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"model: '{path}' is not valid JSON ({exc}); give a Hugging Face config.json") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
            raise ValueError(f"model: '{path}' has no \"model_type\" field; a Hugging Face config.json names its "
                             f"architecture there (like \"gpt2\" or \"llama\")")
    fields = dict(fields)
    model_type = fields.pop("model_type")
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, __version__
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model: model_type '{model_type}' of '{spec}' is unknown to transformers {__version__}; "
                         f"use a causal LM type such as gpt2, llama, qwen2 or mistral")
    if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model: model_type '{model_type}' of '{spec}' is not a causal language model in "
                         f"transformers; use one such as gpt2, llama, qwen2 or mistral")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        fields.pop(key, None)
    if vocab_size is not None and kind != "hf-pretrained":
        fields["vocab_size"] = vocab_size
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GPT-2's default special ids (50256) outside a small vocabulary: fixed below
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model: config of '{spec}' does not load with transformers: {str(exc)[:300]}") from None
    finally:
        hf_logging.set_verbosity(level)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of another vocabulary mean nothing here
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, key, None)
    return config


def _call_function(spec: str, vocab_size: int | None) -> nn.Module:
    module_name, func_name = spec.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model '{spec}': cannot import {func_name} from {module_name} ({exc}); is the module "
                         f"on PYTHONPATH?") from None
    takes_vocab = "vocab_size" in inspect.signature(func).parameters
    model = func(vocab_size=vocab_size) if takes_vocab and vocab_size is not None else func()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model '{spec}' returned {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(spec: str, vocab_size: int | None = None, seed: int = 0) -> nn.Module:
    """The model `spec` names, on the CPU in fp32, its random weights drawn from `seed`.
    `vocab_size` (the tokenizer's; None: the model's own) sets the embedding size where the model
    is built from a config; a pretrained or given model must already be at least that large."""
    kind = model_kind(spec)
    torch.manual_seed(seed)
    if kind == "builtin":
        return Transformer(model_config(spec, vocab_size=vocab_size or BYTE_VOCAB))
    if kind == "function":
        model = _call_function(spec, vocab_size)
        wrapped = model if isinstance(model, (Transformer, CausalLM)) else CausalLM(model)
    else:
        from transformers import AutoModelForCausalLM
        config = _hf_config(spec, kind, vocab_size)
        try:
            if kind == "hf-pretrained":
                model = AutoModelForCausalLM.from_pretrained(spec, config=config, dtype=torch.float32,
                                                             local_files_only=True)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, OSError, KeyError) as exc:
            raise ValueError(f"model '{spec}' ({config.model_type}) does not build with transformers: "
                             f"{str(exc)[:300]}") from None
        wrapped = CausalLM(model)
    from .fragments import find_blocks
    find_blocks(wrapped)  # says now, not at the first sync, if there is nothing to cut fragments along
    have = model_vocab(wrapped)
    if vocab_size is not None and have is not None and have < vocab_size:
        raise ValueError(f"model '{spec}' has a vocabulary of {have}, smaller than the tokenizer's {vocab_size}; "
                         f"use a model built for this tokenizer")
    return wrapped


class CausalLM(nn.Module):
    """Any causal LM behind the engine's call convention. A Hugging Face model gets `input_ids`
    (no KV cache); another module gets the tokens and may return logits, a tuple, or an object
    with `.logits`. The loss is computed here, on targets already shifted by the data loader."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._hf = hasattr(model, "config") and hasattr(model, "get_output_embeddings")

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        out = self.model(input_ids=tokens, use_cache=False) if self._hf else self.model(tokens)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def model_vocab(model: nn.Module) -> int | None:
    """The number of token ids the model takes: its config's or attribute's vocab_size, else its
    first embedding's size; None if it shows none."""
    inner = model.model if isinstance(model, CausalLM) else model
    for source in (getattr(inner, "config", None), getattr(inner, "cfg", None), inner):
        v = getattr(source, "vocab_size", None)
        if isinstance(v, int):
            return v
    emb = next((m for m in inner.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def max_seq_len(model: nn.Module) -> int | None:
    inner = model.model if isinstance(model, CausalLM) else model
    if isinstance(inner, Transformer):
        return inner.cfg.max_seq_len
    config = getattr(inner, "config", None)
    v = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return v if isinstance(v, int) else None


@dataclass(frozen=True)
class ModelInfo:
    kind: str
    n_blocks: int
    vocab_size: int | None
    max_seq_len: int | None
    parameters: int


@functools.lru_cache(maxsize=32)
def model_info(spec: str, vocab_size: int | None = None) -> ModelInfo:
    """What config validation needs to know, from the model built on the meta device (no memory,
    no weights read; a pretrained folder is built from its config)."""
    from .fragments import find_blocks
    kind = model_kind(spec)
    # fork_rng: build_model seeds torch's generator; validating a config must not reseed a run.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if kind == "hf-pretrained":  # the weights' own vocabulary, which must hold the tokenizer's
            model = build_model(str(Path(spec) / "config.json"))
            if vocab_size is not None and model_vocab(model) < vocab_size:
                raise ValueError(f"model '{spec}' has a vocabulary of {model_vocab(model)}, smaller than the "
                                 f"tokenizer's {vocab_size}; use the tokenizer the model was trained with")
        else:
            model = build_model(spec, vocab_size)
    _, blocks = find_blocks(model)
    return ModelInfo(kind, len(blocks), model_vocab(model), max_seq_len(model),
                     sum(p.numel() for p in model.parameters()))


def model_fingerprint(spec: str) -> str:
    """What must be equal for two peers' `--model` to be the same model: the name of a built-in,
    the content of a config (not its path: peers keep files in different places), the config and
    weights of a pretrained folder; for module:function, the name and its module's source.
    Computed once per content: a peer asks for it several times at start (config hash, run config),
    and a pretrained folder's weights may be gigabytes."""
    kind = model_kind(spec)
    if kind in ("builtin", "hf-name"):
        return spec
    if kind == "function":
        return _fingerprint(spec, kind, ())
    path = Path(spec)
    files = [path / "config.json" if path.is_dir() else path] + (_weight_files(path) if kind == "hf-pretrained" else [])
    return _fingerprint(spec, kind, tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=16)
def _fingerprint(spec: str, kind: str, stamps: tuple) -> str:
    """model_fingerprint's hashing; `stamps` (each file's mtime and size) keys the cache."""
    h = hashlib.sha256()
    if kind == "function":
        h.update(spec.encode())
        source = inspect.getsourcefile(importlib.import_module(spec.split(":")[0]))
        if source:
            h.update(Path(source).read_bytes())
    else:
        path = Path(spec)
        config = path / "config.json" if path.is_dir() else path
        try:  # canonical JSON: key order and spacing do not make another model
            h.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            h.update(config.read_bytes())
        if kind == "hf-pretrained":
            for f in _weight_files(path):
                with open(f, "rb") as fh:
                    h.update(hashlib.file_digest(fh, "sha256").digest())
    return f"{kind}:{h.hexdigest()[:16]}"

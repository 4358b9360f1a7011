"""Bring your own model: Hugging Face configs and folders, module:function, generic fragments, and the
errors that say what to fix. Every model here is built from a config written by the test: no download."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from p2pdiloco.data import DataConfig
from p2pdiloco.fragments import build_fragments, find_blocks
from p2pdiloco.models import CausalLM, build_model, model_fingerprint, model_info
from p2pdiloco.simulate import SimConfig, Simulation, run_simulation
from p2pdiloco.streaming import StreamingConfig
from p2pdiloco.swarm.records import config_hash

pytestmark = pytest.mark.timeout(600)

LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "vocab_size": 256,
         "tie_word_embeddings": True}


def write_config(path, fields) -> str:
    path.write_text(json.dumps(fields))
    return str(path)


def small_run(model: str, text_file, steps: int = 20, **data) -> SimConfig:
    return SimConfig(workers=2, steps=steps, batch_size=4, model=model, eval_every=steps, eval_batches=2,
                     data=DataConfig(paths=(str(text_file),), seq_len=32, **data),
                     streaming=StreamingConfig(H=5, fragments=2, tau=1))


def test_a_hugging_face_config_trains_in_simulate_and_loss_falls(tmp_path, text_file):
    cfg = small_run(write_config(tmp_path / "config.json", LLAMA), text_file)
    cfg = replace(cfg, inner=replace(cfg.inner, lr=3e-3, warmup_steps=2))
    result = run_simulation(cfg, progress=None)
    assert result["eval_loss"] < result["eval_loss_initial"] - 1.0, result["eval_curve"]
    assert result["skipped_rounds"] == 0
    names = [f["name"] for f in result["fragments"]]
    assert names == ["blocks0", "blocks1", "shared"]
    # The blocks are Llama's model.layers: fragment 0 holds layers 0 and 2, fragment 1 layer 1.
    sim = Simulation(replace(cfg, steps=1))
    frag0 = sim.workers[0].fragments[0].param_names
    assert {n.split(".")[3] for n in frag0} == {"0", "2"} and all(n.startswith("model.model.layers.") for n in frag0)


def test_every_peer_builds_the_same_model_from_the_seed_and_another_seed_differs():
    a, b, c = build_model("gpt2-tiny", seed=3), build_model("gpt2-tiny", seed=3), build_model("gpt2-tiny", seed=4)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_the_vocabulary_follows_the_tokenizer():
    assert model_info("llama-tiny").vocab_size == 256
    assert model_info("llama-tiny", 1000).vocab_size == 1000
    assert model_info("tiny", 1000).vocab_size == 1000
    model = build_model("gpt2-tiny", 1000)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 1000)


def test_blocks_are_found_generically():
    assert find_blocks(build_model("tiny"))[0] == "blocks"
    assert find_blocks(build_model("gpt2-tiny"))[0] == "model.transformer.h"
    assert find_blocks(build_model("llama-tiny"))[0] == "model.model.layers"
    assert find_blocks(build_model("byo_model:build"))[0] == "model.layers"


def test_module_function_model_trains(text_file):
    cfg = small_run("byo_model:build", text_file)
    cfg = replace(cfg, inner=replace(cfg.inner, lr=3e-3, warmup_steps=2))
    result = run_simulation(cfg, progress=None)
    assert result["eval_loss"] < result["eval_loss_initial"] - 1.0
    assert isinstance(Simulation(replace(cfg, steps=1)).base, CausalLM)


def test_a_pretrained_folder_loads_its_weights(tmp_path):
    model = build_model("llama-tiny", seed=7)
    model.model.save_pretrained(tmp_path / "pretrained")
    loaded = build_model(str(tmp_path / "pretrained"), seed=0)  # the seed does not matter: the weights do
    for (name, x), y in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name
    assert model_info(str(tmp_path / "pretrained")).kind == "hf-pretrained"
    with pytest.raises(ValueError, match="smaller than the tokenizer's 1000"):
        model_info(str(tmp_path / "pretrained"), 1000)


def test_config_hash_follows_the_config_content_not_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_config(tmp_path / "a" / "config.json", LLAMA)
    same = tmp_path / "b" / "config.json"
    same.write_text(json.dumps(LLAMA, indent=4, sort_keys=True))  # another place, another layout
    other = write_config(tmp_path / "other.json", dict(LLAMA, num_hidden_layers=4))
    hashes = [config_hash(SimConfig(model=m)) for m in (a, str(same), other, "llama-tiny", "gpt2-tiny")]
    assert hashes[0] == hashes[1]
    assert len(set(hashes[1:])) == 4
    assert model_fingerprint("tiny") == "tiny"


@pytest.mark.parametrize("content, message", [
    ("not json", "is not valid JSON"),
    ('{"hidden_size": 8}', 'no "model_type" field'),
    ('{"model_type": "no-such-type"}', "unknown to transformers"),
    ('{"model_type": "resnet"}', "not a causal language model"),
])
def test_a_bad_config_json_is_refused_with_what_to_fix(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        SimConfig(model=str(path)).validate()


@pytest.mark.parametrize("spec, message", [
    ("gpt3-175b", "unknown .* give a built-in size"),
    ("byo_model:no_blocks", "no repeated block list"),
    ("byo_model:not_a_module", "not a torch nn.Module"),
    ("no_such_module:build", "cannot import build from no_such_module"),
])
def test_unknown_or_unusable_models_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(model=spec).validate()


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        SimConfig(model=str(tmp_path)).validate()


def test_a_token_id_outside_the_models_vocabulary_is_refused(tmp_path):
    tokens = np.arange(2000, dtype=np.uint16) % 300  # ids up to 299; the byte-vocabulary model has 256
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = SimConfig(workers=1, steps=1, model="gpt2-tiny", data=DataConfig(paths=(str(tmp_path / "tokens.npy"),), seq_len=32),
                    streaming=StreamingConfig(H=5, fragments=1))
    with pytest.raises(ValueError, match="token id 299 is outside the model's vocabulary of 256"):
        Simulation(cfg)


def test_fragments_of_the_builtin_model_are_unchanged():
    """The generic block search finds `blocks` and cuts the built-in model as before (golden runs)."""
    model = build_model("tiny")
    fragments = build_fragments(model, 4, 2)
    assert [f.name for f in fragments] == ["blocks0", "blocks1", "shared"]
    assert fragments[0].param_names[0] == "blocks.0.attn_norm.weight"
    assert {n.split(".")[1] for n in fragments[1].param_names} == {"1", "3"}


def test_local_swarm_gives_its_peers_absolute_paths(tmp_path, monkeypatch):
    """Each peer of `local-swarm` runs in a folder of its own: files named relative to here must still be found."""
    from p2pdiloco.swarm.cli import absolute_paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokens").mkdir()
    args = ["--model", "config.json", "--data", "tokens", "missing", "--tokenizer=config.json", "--steps", "5",
            "--json", "config.json"]
    assert absolute_paths(args) == ["--model", str(tmp_path / "config.json"), "--data", str(tmp_path / "tokens"),
                                    "missing", f"--tokenizer={tmp_path / 'config.json'}", "--steps", "5",
                                    "--json", "config.json"]
    (tmp_path / "tiny").mkdir()  # a built-in model's name stays a name
    assert absolute_paths(["--model", "tiny"]) == ["--model", "tiny"]

"""Your own model, tokenizer and data in a real swarm: two peer processes train a Hugging Face model
built from a config.json, on shards made by `p2pdiloco tokenize` with a tokenizer trained here."""
from __future__ import annotations

import json

import pytest

from p2pdiloco import shards
from peers import TINY
from test_swarm import finish_with_same_models, summary

pytestmark = pytest.mark.timeout(420)

GPT2 = {"model_type": "gpt2", "n_embd": 48, "n_layer": 4, "n_head": 4, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def test_two_peers_train_a_hugging_face_model_with_a_tokenizer_and_agree(swarm, tmp_path, text_file):
    tokenizer = tmp_path / "tokenizer.json"
    shards.train([str(text_file)], 400, str(tokenizer))
    lines = text_file.read_text().splitlines()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "\n".join(lines[i: i + 25])}) + "\n" for i in range(0, len(lines), 25)))
    shards.tokenize([str(docs)], str(tokenizer), str(tmp_path / "shards"), progress=False)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT2))

    args = [a if a != "tiny" else str(config) for a in TINY]
    args += ["--tokenizer", str(tokenizer), "--data", str(tmp_path / "shards"), "--steps", "20",
             "--wait-for-peers", "2", "--json", "s.json"]
    peers = swarm.start_run(2, *args)
    finish_with_same_models(peers)  # both exit 0 with equal global parameters (their checkpoints)
    a, b = summary(peers[0]), summary(peers[1])
    for s in (a, b):
        assert s["completed"] and s["skipped_rounds"] == 0
        assert s["group_sizes"].get("2", 0) > 0  # rounds were averaged by both
        assert s["eval_loss"] < s["eval_loss_initial"] - 1.0
    assert a["eval_loss"] == b["eval_loss"]  # the same global model on the same validation windows
    assert "first average applied" in peers[0].output()

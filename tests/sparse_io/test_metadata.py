"""Sparsity metadata in config.json and elsa_config.json; unknown keys (hf_elsa.sparse_io.metadata)."""

from __future__ import annotations

import json
import logging

import huggingface_hub
import pytest

import hf_elsa
from hf_elsa import load_sparse_model, sparse_io
from hf_elsa.sparse_io import ELSA_CONFIG_NAME, MASKS_NAME
from hf_elsa.targets import find_prunable_modules

from .helpers import pruned_model


def test_metadata_in_config_elsa_config_and_model_card(tmp_path):
    evaluation = {"protocol": "word perplexity, 512-token windows", "results": {"wiki ppl": 31.5}}
    model = pruned_model("gpt2", metadata={"base_model": "openai-community/gpt2", "evaluation": evaluation})
    model.save_pretrained(tmp_path / "m")

    entry = json.loads((tmp_path / "m" / "config.json").read_text())["elsa_sparsity"]
    assert entry["method"] == "magnitude" and entry["sparsity"] == 0.9 and entry["sparsity_type"] == "unstructured"
    assert entry["hf_elsa_version"] == hf_elsa.__version__ and entry["format"] == "dense"
    assert set(entry["tensors"]) == {f"{n}.weight" for n in find_prunable_modules(model)}
    assert all(0.89 < s < 0.91 for s in entry["tensors"].values())
    assert "target_modules" in entry

    meta = json.loads((tmp_path / "m" / ELSA_CONFIG_NAME).read_text())
    assert meta["elsa_format_version"] == sparse_io.FORMAT_VERSION
    assert meta["save_id"] == entry["save_id"]
    assert set(meta["files"]) == {"model.safetensors", MASKS_NAME}

    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "hf_elsa"
    assert {"elsa", "sparse", "pruned"} <= set(card.data.tags)
    assert card.data.base_model == "openai-community/gpt2"
    assert "word perplexity, 512-token windows" in card.text and "31.5" in card.text
    assert "transformer.h.0.attn.c_attn.weight" in card.text and "magnitude" in card.text


def test_unknown_keys_are_tolerated_and_kept(tmp_path, caplog):
    model = pruned_model()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / ELSA_CONFIG_NAME
    meta = json.loads(path.read_text())
    meta["from_the_future"] = {"x": 1}
    path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="hf_elsa.sparse_io"):
        loaded = load_sparse_model(tmp_path / "m")
    assert "from_the_future" in caplog.text
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / ELSA_CONFIG_NAME).read_text())["from_the_future"] == {"x": 1}

    meta["elsa_format_version"] = sparse_io.FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="newer"):
        load_sparse_model(tmp_path / "m")

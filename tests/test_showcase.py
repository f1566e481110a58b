"""The showcase around the real model: the demo folder's card, the embedded model's record of its base model."""

from __future__ import annotations

import huggingface_hub
from conftest import make_model
from transformers import AutoModelForCausalLM

from hf_elsa.oneshot import magnitude
from hf_elsa.showcase.benchmark import Budget
from hf_elsa.showcase.demo import SMOLLM2_HUB_ID, _record_base_model, record_demo_evaluation
from hf_elsa.sparse_io import attach_sparsity
from hf_elsa.sparse_io.card import recorded_base_model


def test_the_embedded_model_folder_records_its_base_model(tmp_path):
    _record_base_model(tmp_path)
    assert recorded_base_model(str(tmp_path)) == SMOLLM2_HUB_ID
    (tmp_path / "README.md").write_text("---\nbase_model: someone/else\n---\n")
    _record_base_model(tmp_path)  # a README already there is left alone
    assert recorded_base_model(str(tmp_path)) == "someone/else"


def test_demo_folder_card_names_base_model_data_and_dense_score(tmp_path):
    source = tmp_path / "cache"
    make_model("llama").save_pretrained(source)
    _record_base_model(source)
    model = AutoModelForCausalLM.from_pretrained(source)  # as load_smollm2 loads the cached folder
    attach_sparsity(model, magnitude(model, sparsity=0.5), {"method": "elsa", "sparsity": 0.5})
    budget = Budget(max_steps=40, batch_size=4, block_size=128, eval_windows=16)
    record_demo_evaluation(model, {"dense": 22.19, "magnitude": 400.0, "elsa": 31.4}, budget, 95)
    model.save_pretrained(tmp_path / "out")
    card = huggingface_hub.ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == SMOLLM2_HUB_ID and "# SmolLM2-135M-Instruct, pruned" in card.text
    assert "| perplexity | 22.19 | 31.4 |" in card.text
    assert "first 16 non-overlapping 512-token windows" in card.text
    assert "40 steps of 4 x 128 tokens from the embedded Wikipedia sample's 95 training articles" in card.text

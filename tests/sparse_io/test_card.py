"""The model card (hf_elsa.sparse_io.card)."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
import transformers

import hf_elsa
from hf_elsa import load_sparse_model
from hf_elsa.sparse_io import ELSA_CONFIG_NAME, build_model_card, get_sparsity, record_evaluation
from hf_elsa.sparse_io.card import CARD_START

from .helpers import pruned_model, tiny_model


def test_user_readme_text_is_kept(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# My notes\n\nKeep this.\n")
    model = pruned_model()
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # the second save replaces only our section
    text = (folder / "README.md").read_text()
    card = huggingface_hub.ModelCard(text)
    assert "Keep this." in text and text.count(CARD_START) == 1
    assert card.data.license == "apache-2.0" and {"mine", "elsa"} <= set(card.data.tags)


METRICS = {  # what trainer.evaluate() returns
    "eval_loss": 3.4563,
    "eval_perplexity": 31.70,
    "eval_runtime": 12.5,
    "eval_samples_per_second": 8.0,
    "eval_steps_per_second": 2.0,
    "epoch": 1.0,
}
PROTOCOL = {
    "dataset": "wikitext",
    "dataset_name": "WikiText-2",
    "dataset_config": "wikitext-2-raw-v1",
    "split": "test",
    "seqlen": 512,
    "description": "token perplexity, non-overlapping 512-token windows",
}


@pytest.mark.parametrize("compressed", [False, True])
def test_recorded_evaluation_reaches_metadata_card_and_model_index(compressed, tmp_path):
    model = pruned_model()
    recorded = record_evaluation(model, METRICS, PROTOCOL)
    assert recorded == {"protocol": PROTOCOL, "results": {"loss": 3.4563, "perplexity": 31.70}}  # timings dropped
    model.save_pretrained(tmp_path / "m", compressed=compressed)

    assert json.loads((tmp_path / "m" / ELSA_CONFIG_NAME).read_text())["evaluation"] == recorded
    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"loss", "perplexity"} and results["perplexity"].metric_value == 31.70
    ppl = results["perplexity"]
    assert (ppl.task_type, ppl.dataset_type, ppl.dataset_name) == ("text-generation", "wikitext", "WikiText-2")
    assert (ppl.dataset_config, ppl.dataset_split) == ("wikitext-2-raw-v1", "test")
    assert ppl.dataset_args == {"seqlen": 512, "description": PROTOCOL["description"]}
    assert "| perplexity | 31.7 |" in card.text and "non-overlapping 512-token windows" in card.text
    assert "Not evaluated yet." not in card.text

    # the results survive a load and a re-save (and a re-save of the card replaces, not duplicates, them)
    loaded = load_sparse_model(tmp_path / "m")
    loaded.save_pretrained(tmp_path / "m")
    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert len(card.data.eval_results) == 2 and card.text.count("## Evaluation") == 1


def test_card_writer_takes_results_directly_and_without_results_has_no_model_index(tmp_path):
    model = pruned_model()
    state = get_sparsity(model)
    card = build_model_card(state.config, eval_results={"ppl": 40.0}, eval_protocol="token ppl on my notes")
    assert card.data.eval_results[0].metric_value == 40.0
    assert card.data.eval_results[0].dataset_name == "token ppl on my notes"
    plain = build_model_card(state.config)
    assert plain.data.eval_results is None and "model-index" not in str(plain) and "Not evaluated yet." in plain.text


def test_record_evaluation_needs_attached_masks_and_numbers():
    with pytest.raises(ValueError, match="no sparsity attached"):
        record_evaluation(tiny_model(), METRICS)
    with pytest.raises(ValueError, match="no numeric results"):
        record_evaluation(pruned_model(), {"eval_runtime": 1.0, "note": "x"})
    with pytest.raises(ValueError, match=r"record_evaluation: key evaluation\['protocol'\]"):
        record_evaluation(pruned_model(), METRICS, protocol=5)


@pytest.mark.parametrize(
    "compressed, library_name", [(False, "transformers"), (True, "hf_elsa")], ids=["dense", "compressed"]
)
def test_library_name_per_format_and_how_to_load(compressed, library_name, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m", compressed=compressed)
    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == library_name and "hf_elsa" in card.data.tags
    assert "hf_elsa.load_sparse_model" in card.text
    if compressed:
        assert "`transformers.AutoModelForCausalLM.from_pretrained` cannot read it" in card.text
    else:
        assert "`AutoModelForCausalLM.from_pretrained` also loads it" in card.text


def test_card_cites_elsa_and_lists_framework_versions(tmp_path):
    pruned_model().save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert "## Citation" in text and "```bibtex" in text
    for fact in (
        "The Unseen Frontier: Pushing the Limits of {LLM} Sparsity with Surrogate-Free {ADMM}",
        "Lee, Kwanhee and Jang, Hyeondo and Lee, Dongyeop and Alistarh, Dan and Lee, Namhoon",
        "International Conference on Learning Representations (ICLR)",
        "year          = {2026}",
        "eprint        = {2510.01650}",
    ):
        assert fact in text, fact
    versions = {"hf_elsa": hf_elsa.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    for name, version in versions.items():
        assert f"- {name}: {version}" in text
    assert "- accelerate: " in text and "- datasets: " in text


def test_card_has_a_per_layer_sparsity_chart(tmp_path):
    model = pruned_model(sparsity=0.5)
    with torch.no_grad():  # layer 1 further pruned to 100% by hand: zeros where the masks keep are allowed
        for name, param in model.named_parameters():
            if ".layers.1." in name and name in get_sparsity(model).masks:
                param.zero_()
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    chart = text.split("```text\n")[1].split("```")[0].splitlines()
    assert chart[0] == "layer  sparsity" and len(chart) == 3  # the tiny llama has 2 decoder layers
    assert chart[1] == f"    0  {'#' * 20}{'.' * 20}   50.00%"
    assert chart[2] == f"    1  {'#' * 40}  100.00%"
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == text  # deterministic


def test_uniform_sparsity_is_one_line_and_the_tensors_are_collapsed(tmp_path):
    """A uniform run (every tensor at the same sparsity) gets one sentence, not a bar per layer and a row per type."""
    model = pruned_model(sparsity=0.5)
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    section = text.split("## Sparsity\n")[1].split("\n## ")[0]
    tensors = len(get_sparsity(model).masks)
    assert f"Uniform: each of the {tensors} pruned tensors in 2 layers is 50.00% sparse" in section
    assert "```text" not in section and "| layers | tensors |" not in section
    assert "<details><summary>Per tensor</summary>" in section and section.count("| `model.layers.") == tensors

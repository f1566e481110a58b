"""The showcase around the real model: the demo folder's card, the embedded model's record of its base model, and
the inference benchmark (`hf-elsa bench-inference`)."""

from __future__ import annotations

import huggingface_hub
from conftest import make_model
from transformers import AutoModelForCausalLM

from hf_elsa.oneshot import magnitude
from hf_elsa.showcase.benchmark import Budget
from hf_elsa.showcase.demo import SMOLLM2_HUB_ID, _record_base_model, record_demo_evaluation
from hf_elsa.sparse_io import attach_sparsity
from hf_elsa.sparse_io.card import recorded_base_model


def _pruned(sparsity=0.9):
    model = make_model("llama").eval()
    magnitude(model, sparsity, "unstructured")
    return model


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


def test_bench_inference_smoke(capsys):
    from hf_elsa.showcase.inference_bench import bench_inference

    result = bench_inference(
        model=_pruned(),
        name="tiny",
        batch_sizes=(1, 2),
        prompt_tokens=4,
        prefill_tokens=8,
        new_tokens=2,
        repeats=1,
        threads=None,
        convert_kwargs={"min_speedup": 0.0, "prefill_min_speedup": 0.0, "repeats": 1},
    )
    assert result.rel_logit_error <= 1e-4 and result.same_greedy_tokens
    assert set(result.decode_tok_s) == {"dense", "sparse"} and set(result.decode_tok_s["dense"]) == {1, 2}
    assert result.weight_mib["sparse"] < result.weight_mib["dense"]
    assert "decode tokens/s, batch 2" in capsys.readouterr().out


def test_bench_command_line_on_a_folder(tmp_path, capsys):
    from hf_elsa.showcase.inference_bench import main

    _pruned().save_pretrained(tmp_path / "tiny")  # a plain folder with exact zeros
    results = main(
        [
            str(tmp_path / "tiny"),
            "--out",
            str(tmp_path / "out"),
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--prompt-tokens",
            "4",
            "--prefill-tokens",
            "8",
            "--batch-sizes",
            "1",
            "2",
            "--threads",
            "0",
        ]
    )
    assert len(results) == 1 and abs(results[0].sparsity - 0.9) < 0.01
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "speedup.png"}
    assert "decode tok/s b=2" in (tmp_path / "out" / "results.md").read_text()
    assert "Linears converted" in capsys.readouterr().out


def test_bench_says_why_no_layer_converted_and_titles_the_plot_with_the_model(tmp_path, capsys):
    """`bench-inference` said "1.01x" and nothing else when no layer converted: each kind of layer's measured
    speed-up against the margin now says why; the plot is titled with the model's name."""
    from hf_elsa.showcase.inference_bench import bench_inference, plot_title

    _pruned().save_pretrained(tmp_path / "tiny-llama-90")
    result = bench_inference(tmp_path / "tiny-llama-90", batch_sizes=(1,), prompt_tokens=4, prefill_tokens=8,
                             new_tokens=2, repeats=1, threads=None,
                             convert_kwargs={"min_speedup": 1e6, "prefill_min_speedup": 1e6, "repeats": 1})  # fmt: skip
    out = capsys.readouterr().out
    assert result.converted_layers == "0/14" and result.margin == {1: 1e6, 8: 1e6}
    assert "why 14 of 14 Linears stayed dense" in out and "kernels: none" in out
    line = next(x for x in out.splitlines() if x.startswith("  self_attn.q_proj x2: "))
    assert "1 tok " in line and "8 tok " in line and "(needs 1000000.00x)" in line
    assert all(layer["speedup"] and not layer["converted"] for layer in result.layers.values())
    assert plot_title([result]).startswith("tiny-llama-90, CPU, ")
    result.name = "SmolLM2-135M 50%"  # the --smollm2 rows share the model's name
    twin = type(result)(**{**result.to_dict(), "name": "SmolLM2-135M 70%"})
    assert plot_title([result, twin]).startswith("SmolLM2-135M, CPU, ")

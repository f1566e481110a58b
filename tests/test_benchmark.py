"""The benchmark driver on a tiny model: every method runs, reports are written, numbers are sane."""

import json

import torch
from conftest import make_char_tokenizer, make_model

from hf_elsa.benchmark import Budget, run_benchmark

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 30 for i in range(12)]


def test_run_benchmark_writes_table_plot_and_json(tmp_path):
    tokenizer = make_char_tokenizer()

    def load():
        return make_model("llama", seed=0), tokenizer

    budget = Budget(max_steps=3, batch_size=2, block_size=16, calibration_samples=4, eval_seqlen=16,
                    eval_windows=4, learning_rate=1e-3, bf16=False)
    saved = []
    results = run_benchmark(load, DOCS[:10], DOCS[10:], sparsities=(0.5,), nm_patterns=("2:4",), budget=budget,
                            output_dir=str(tmp_path), log=lambda line: None,
                            on_model=lambda r, m: saved.append(r.method))
    methods = {r.method for r in results}
    assert methods == {"dense", "magnitude", "wanda", "sparsegpt", "masked_ft", "elsa"}
    for r in results:
        assert r.perplexity > 1 and torch.isfinite(torch.tensor(r.perplexity))
        expected = 0.0 if r.method == "dense" else 0.5
        assert abs(r.achieved_sparsity - expected) < 0.01, (r.method, r.sparsity_type, r.achieved_sparsity)
    assert len(saved) == len(results)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == len(results) and data["budget"]["max_steps"] == 3
    table = (tmp_path / "results.md").read_text()
    assert "| ELSA |" in table and "2:4" in table and "50%" in table
    assert (tmp_path / "perplexity.png").stat().st_size > 1000

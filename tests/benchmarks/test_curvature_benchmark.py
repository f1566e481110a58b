"""benchmarks/curvature.py on a tiny model: every cell of the grid runs and lands in the JSON and the table."""

import json

import pytest
from conftest import load_script, make_char_tokenizer, make_model

from hf_elsa.showcase.benchmark import Budget

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(8)]


def _script():
    return load_script("benchmarks/curvature.py")


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_grid_writes_json_and_table(tmp_path):
    script = _script()
    tokenizer = make_char_tokenizer()
    budget = Budget(
        max_steps=2, batch_size=2, block_size=16, eval_seqlen=16, eval_windows=2, learning_rate=1e-3, bf16=False
    )
    results = script.run_grid(
        lambda: (make_model("llama"), tokenizer),
        DOCS[:6],
        DOCS[6:],
        sparsities=(0.5,),
        importances=("fisher", "hutchinson"),
        sam_rhos=(0.0, 0.01),
        budget=budget,
        output_dir=str(tmp_path),
        overrides={"recipe": "paper", "admm_interval": 1},
        log=lambda line: None,
    )
    assert [(r["importance"], r["sam_rho"]) for r in results] == [
        ("fisher", 0.0),
        ("fisher", 0.01),
        ("hutchinson", 0.0),
        ("hutchinson", 0.01),
    ]
    for r in results:
        assert r["perplexity"] > 1 and r["seconds_per_step"] > 0 and r["steps"] == 2
        assert abs(r["achieved_sparsity"] - 0.5) < 0.01
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == results and data["overrides"]["recipe"] == "paper"
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| importance | SAM rho | 50% ppl | 50% s/step |" in table
    rows = [line for line in table if line.startswith("| hutchinson | 0.01 |")]
    assert len(rows) == 1 and f"{results[3]['perplexity']:.1f}" in rows[0]


def test_grid_rejects_bad_combinations_before_any_run(tmp_path):
    script = _script()
    loads = []
    with pytest.raises(ValueError, match="importance='adam'"):
        script.run_grid(
            lambda: loads.append(1),
            DOCS,
            DOCS,
            importances=("adam",),
            output_dir=str(tmp_path),
            overrides={"base_optimizer": "sassha"},
        )
    with pytest.raises(ValueError, match="importances"):
        script.run_grid(lambda: loads.append(1), DOCS, DOCS, importances=("oracle",), output_dir=str(tmp_path))
    assert not loads


def test_merge_combines_parallel_parts_and_refuses_mixed_budgets(tmp_path):
    script = _script()
    for part in "abc":
        (tmp_path / part).mkdir()
    budget = Budget(max_steps=3, bf16=False)
    row = {"importance": "fisher", "sam_rho": 0.0, "perplexity": 12.5, "seconds_per_step": 1.5}
    script.write_reports([{**row, "sparsity": 0.7}], budget, {"recipe": "elsa"}, str(tmp_path / "a"))
    script.write_reports(
        [{**row, "sparsity": 0.9, "perplexity": 99.0}], budget, {"recipe": "elsa"}, str(tmp_path / "b")
    )
    merged = script.merge_reports([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "all"))
    assert [r["sparsity"] for r in merged] == [0.7, 0.9]
    table = (tmp_path / "all" / "results.md").read_text()
    assert "| fisher | 0 | 12.5 | 1.50 | 99.0 | 1.50 |" in table
    script.write_reports(
        [row | {"sparsity": 0.9}], Budget(max_steps=4, bf16=False), {"recipe": "elsa"}, str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match="another budget"):
        script.merge_reports([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "bad"))

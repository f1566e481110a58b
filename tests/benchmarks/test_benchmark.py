"""The benchmark driver on a tiny model: every method runs, reports are written, numbers are sane."""

import json

import pytest
import torch
from conftest import load_script, make_char_tokenizer, make_model

from hf_elsa.showcase.benchmark import Budget, run_benchmark

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 30 for i in range(12)]


@pytest.mark.filterwarnings(
    "ignore:ElsaConfig.*leave round:UserWarning"
)  # 2-3 steps: expected, tested in test_trainer_inputs
def test_run_benchmark_writes_table_plot_and_json(tmp_path):
    tokenizer = make_char_tokenizer()

    def load():
        return make_model("llama", seed=0), tokenizer

    budget = Budget(
        max_steps=3,
        batch_size=2,
        block_size=16,
        calibration_samples=4,
        eval_seqlen=16,
        eval_windows=4,
        learning_rate=1e-3,
        bf16=False,
    )
    saved = []
    results = run_benchmark(
        load,
        DOCS[:10],
        DOCS[10:],
        sparsities=(0.5,),
        nm_patterns=("2:4",),
        budget=budget,
        output_dir=str(tmp_path),
        log=lambda line: None,
        on_model=lambda r, m: saved.append(r.method),
    )
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


def test_merge_reports_combines_parallel_parts_and_rejects_mixed_budgets(tmp_path):
    from hf_elsa.showcase.benchmark import Result, merge_reports, write_reports

    budget = Budget(max_steps=3, bf16=False)
    dense = Result("dense", "dense", 0.0, 20.0, 1.0, 0.0)
    part1 = [
        dense,
        Result("elsa", "unstructured", 0.5, 30.0, 5.0, 0.5),
        Result("magnitude", "unstructured", 0.5, 90.0, 0.1, 0.5),
    ]
    part2 = [dense, Result("elsa", "unstructured", 0.9, 300.0, 5.0, 0.9)]
    for name, part in (("a", part1), ("b", part2)):
        (tmp_path / name).mkdir()
        write_reports(part, budget, str(tmp_path / name))

    merged = merge_reports([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "all"))

    assert [(r.method, r.sparsity) for r in merged] == [
        ("dense", 0.0),
        ("magnitude", 0.5),
        ("elsa", 0.5),
        ("elsa", 0.9),
    ]
    table = (tmp_path / "all" / "results.md").read_text()
    assert "| ELSA | 30.0 | 300.0 | 10 |" in table and "Dense: 20.00" in table
    write_reports(part2, Budget(max_steps=3, eval_windows=4, bf16=False), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="different budget"):  # another evaluation: nothing comparable
        merge_reports([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "all"))
    # only the training rows were re-run with a new training budget: the old run's untrained rows are reused
    old = [
        dense,
        Result("sparsegpt", "unstructured", 0.9, 900.0, 9.0, 0.9),
        Result("elsa", "unstructured", 0.9, 1.0, 1.0, 0.9),
    ]
    (tmp_path / "old").mkdir()
    write_reports(old, Budget(max_steps=99, learning_rate=1e-4, bf16=False), str(tmp_path / "old"))
    merged = merge_reports([str(tmp_path / "a"), str(tmp_path / "old")], str(tmp_path / "all"))
    assert [(r.method, r.sparsity, r.perplexity) for r in merged] == [
        ("dense", 0.0, 20.0),
        ("magnitude", 0.5, 90.0),
        ("sparsegpt", 0.9, 900.0),
        ("elsa", 0.5, 30.0),  # the old budget's ELSA row at 0.9 is not mixed in
    ]
    assert json.loads((tmp_path / "all" / "results.json").read_text())["budget"]["max_steps"] == 3


def test_table_columns_are_sparsities_ascending_then_nm_patterns():
    from hf_elsa.showcase.benchmark import Result, markdown_table

    results = [
        Result("elsa", "2:4", 0.5, 80.0, 1.0, 0.5),
        Result("elsa", "unstructured", 0.9, 900.0, 1.0, 0.9),
        Result("elsa", "unstructured", 0.5, 30.0, 1.0, 0.5),
    ]
    table = markdown_table(results, Budget(max_steps=3, bf16=False))
    assert "| method | 50% | 90% | 2:4 | seconds (total) |" in table
    assert "| ELSA | 30.0 | 900.0 | 80.0 | 3 |" in table


def test_plot_one_setting_as_bars_and_a_sweep_with_ratio_to_dense(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_elsa.showcase.benchmark import Result, plot

    dense = Result("dense", "dense", 0.0, 20.0, 1.0, 0.0)
    one = [
        dense,
        Result("magnitude", "unstructured", 0.5, 300.0, 1, 0.5),
        Result("elsa", "unstructured", 0.5, 30, 1, 0.5),
    ]
    assert plot(one, str(tmp_path / "one.png")) == "bars"
    sweep = one + [
        Result("magnitude", "unstructured", 0.9, 1e8, 1, 0.9),  # far above the ratio panel's cut
        Result("elsa", "unstructured", 0.9, 2000.0, 1, 0.9),
        Result("elsa", "2:4", 0.5, 80.0, 1, 0.5),
        Result("sparsegpt", "2:4", 0.5, 78.0, 1, 0.5),
    ]
    assert plot(sweep, str(tmp_path / "sweep.png")) == "sweep"
    assert (tmp_path / "one.png").stat().st_size > 1000 and (tmp_path / "sweep.png").stat().st_size > 1000
    assert plot([dense], str(tmp_path / "none.png")) is None


def test_benchmark_prints_no_trainer_logs_and_demo_silences_loading_bars(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from hf_elsa.showcase.demo import quiet_transformers

    tokenizer = make_char_tokenizer()
    budget = Budget(max_steps=2, batch_size=2, block_size=16, calibration_samples=2, eval_seqlen=16, eval_windows=2,
                    bf16=False, elsa_overrides={"admm_fraction": 0.5})  # fmt: skip
    lines = []
    run_benchmark(lambda: (make_model("llama"), tokenizer), DOCS[:4], DOCS[10:], sparsities=(0.5,),
                  methods=("dense", "elsa"), nm_patterns=(), budget=budget, output_dir=str(tmp_path),
                  log=lines.append)  # fmt: skip
    assert len(lines) == 2 and "'loss'" not in capsys.readouterr().out
    before = hf_logging.is_progress_bar_enabled()
    with quiet_transformers():
        assert not hf_logging.is_progress_bar_enabled()
        make_model("llama").save_pretrained(tmp_path / "m")
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before


def test_quality_table_reads_logs_and_earlier_tables(tmp_path):
    """benchmarks/quality.py table: RESULT + COMMAND lines of logs, plus the cells of an earlier results.json."""
    quality = load_script("benchmarks/quality.py")
    config = {c: None for c in quality.COLUMNS}
    cell = {
        "tag": "T1",
        "sparsity": 0.7,
        "sparsity_type": "unstructured",
        "ppl": 70.04,
        "step_s": 5.0,
        "config": config,
    }
    log = tmp_path / "T1.log"
    log.write_text(
        "COMMAND OMP_NUM_THREADS=1 python benchmarks/quality.py run T1 --sparsity 0.7 --warmup_steps 10\n"
        "noise\nRESULT " + json.dumps(cell) + "\n"
    )
    earlier = tmp_path / "results.json"
    earlier.write_text(
        json.dumps([{**cell, "tag": "T0", "ppl": 80.0, "sparsity_type": "2:4", "command": "x run T0 --a"}])
    )
    (tmp_path / "unfinished.log").write_text("COMMAND x\n")
    with pytest.raises(ValueError, match="no RESULT line"):
        quality.read_results([str(tmp_path / "unfinished.log")])
    quality.main(["table", str(earlier), str(log), "--output_dir", str(tmp_path / "out")])
    rows = (tmp_path / "out" / "results.md").read_text().splitlines()[2:]
    assert (
        len(rows) == 2
        and "| 70% |" in rows[0]
        and "70.0" in rows[0]
        and "`--sparsity 0.7 --warmup_steps 10`" in rows[0]
    )
    assert "| 2:4 |" in rows[1] and "`--a`" in rows[1]
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == 2


@pytest.mark.filterwarnings(
    "ignore:ElsaConfig.*leave round:UserWarning"
)  # 2-3 steps: expected, tested in test_trainer_inputs
@pytest.mark.parametrize("budget_lr", [None, 5e-4])
def test_training_rows_get_the_recipe_learning_rate_of_their_own_sparsity(budget_lr, tmp_path, monkeypatch):
    """learning_rate=None: each training row resolves the recipe's rate at its own sparsity (3e-4 at 50%, 1e-3
    from 70% and for N:M), for ELSA and masked fine-tuning alike; a given rate is used everywhere."""
    from hf_elsa import ElsaTrainer

    seen = []
    monkeypatch.setattr(ElsaTrainer, "train", lambda self, *a, **k: seen.append((self.args.sparsity_type,
                        self.args.sparsity, self.args.admm_init, self.args.learning_rate)))  # fmt: skip
    tokenizer = make_char_tokenizer()
    budget = Budget(max_steps=2, batch_size=2, block_size=16, eval_seqlen=16, eval_windows=1, bf16=False,
                    learning_rate=budget_lr)  # fmt: skip
    run_benchmark(lambda: (make_model("llama"), tokenizer), DOCS[:10], DOCS[10:], sparsities=(0.5, 0.7),
                  nm_patterns=("2:4",), methods=("masked_ft", "elsa"), budget=budget, output_dir=str(tmp_path),
                  log=lambda line: None)  # fmt: skip
    expected = {0.5: 3e-4, 0.7: 1e-3}
    assert len(seen) == 6
    for kind, sparsity, _, lr in seen:
        want = budget_lr or (1e-3 if kind == "2:4" else expected[sparsity])
        assert lr == pytest.approx(want), (kind, sparsity, lr)

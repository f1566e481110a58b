"""hf_elsa's logs go through transformers' logging and show by default; TensorBoard gets the elsa/* scalars."""

from __future__ import annotations

import glob
import logging

import pytest
from conftest import lm_dataset, make_model

from hf_elsa import ElsaTrainer
from hf_elsa._logging import get_logger, get_verbosity, set_verbosity


@pytest.fixture
def restore_verbosity():
    level = get_verbosity()
    yield
    set_verbosity(level)


def test_end_of_run_summary_shows_by_default(make_args, capsys, restore_verbosity):
    set_verbosity("info")
    ElsaTrainer(model=make_model("llama"), args=make_args(sparsity=0.5), train_dataset=lm_dataset(16)).train()
    assert "hf_elsa: 14 pruned tensors, sparsity 0.5000" in capsys.readouterr().err  # stderr, no set-up needed


def test_log_level_follows_the_trainer_arguments(make_args, capsys, restore_verbosity):
    logger = get_logger("hf_elsa.trainer")
    assert logger.name == "hf_elsa.trainer" and logging.getLogger("hf_elsa").handlers
    ElsaTrainer(model=make_model("llama"), args=make_args(sparsity=0.5, log_level="warning"),
                train_dataset=lm_dataset(16)).train()  # fmt: skip
    assert "pruned tensors" not in capsys.readouterr().err
    assert get_verbosity() == logging.WARNING


def test_tensorboard_receives_the_elsa_scalars(make_args, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(max_steps=6, report_to=["tensorboard"], logging_steps=1, output_dir=str(tmp_path / "tb"))
    ElsaTrainer(model=make_model("llama"), args=args, train_dataset=lm_dataset(16)).train()
    files = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents*"), recursive=True)
    assert files
    tags = set()
    for path in files:
        events = EventAccumulator(path)
        events.Reload()
        tags |= set(events.Tags()["scalars"])
        if "train/elsa/weight_sparsity" in events.Tags()["scalars"]:
            sparsity = [e.value for e in events.Scalars("train/elsa/weight_sparsity")]
    for key in ("train/elsa/lambda", "train/elsa/primal_residual", "train/elsa/mask_change",
                "train/elsa/weight_sparsity", "train/loss"):  # fmt: skip
        assert key in tags, (key, sorted(tags))
    assert abs(sparsity[-1] - 0.7) < 1e-3  # the last logged step is exactly sparse

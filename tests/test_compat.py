"""hf_elsa.compat: the private/renamed transformers touch points, each against the installed version."""

import warnings

import pytest
import torch
from conftest import make_model

from hf_elsa.compat import cached_forward


def test_cached_forward_decodes_like_a_full_forward_without_deprecation_warnings():
    model = make_model("llama").eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the renamed keyword (transformers 5.24) must not warn
        full = model(ids).logits[:, -1]
        out, cache = cached_forward(model, ids[:, :-1], None)
        out, cache = cached_forward(model, ids[:, -1:], cache)
    assert cache is not None
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_cached_forward_uses_past_key_values_where_the_model_only_knows_it():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return {"past_key_values": (past_key_values or 0) + 1}

    _, cache = cached_forward(Old(), torch.zeros(1, 1), None)
    _, cache = cached_forward(Old(), torch.zeros(1, 1), cache)
    assert cache == 2


def test_known_upstream_noise_is_dropped_and_nothing_else():
    """compat.UPSTREAM_NOISE: each dated entry drops its own record; the same logger's other records pass."""
    import logging

    from hf_elsa.compat import UPSTREAM_NOISE, silence_upstream_noise

    silence_upstream_noise()
    silence_upstream_noise()  # idempotent: one filter per entry
    for name, prefix, why in UPSTREAM_NOISE:
        assert why[:4].isdigit(), f"{name}: the entry says when it was checked"
        logger = logging.getLogger(name)
        assert len(logger.filters) == len({p for n, p, _ in UPSTREAM_NOISE if n == name})
        record = logger.makeRecord(name, logging.WARNING, __file__, 1, prefix + " for 'x/y'", (), None)
        other = logger.makeRecord(name, logging.WARNING, __file__, 1, "something else went wrong", (), None)
        assert not logger.filter(record) and logger.filter(other)


def test_known_upstream_warnings_are_ignored_and_nothing_else():
    from hf_elsa.compat import UPSTREAM_WARNINGS, silence_upstream_noise

    for category, prefix, why in UPSTREAM_WARNINGS:
        assert why[:4].isdigit()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_upstream_noise()  # installs its filters in front of "always"
            warnings.warn(prefix + ", then pinned memory won't be used.", category)
            warnings.warn("another warning of the same kind", category)
        assert [str(w.message) for w in caught] == ["another warning of the same kind"]


def test_commands_start_without_upstream_noise():
    """`hf-elsa prune --help` printed "Skipping publisher trust check ..." (kernels, offline) before anything else."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hf_elsa", "prune", "--help"], capture_output=True, text=True,
                          env=env, check=True, timeout=120)  # fmt: skip
    assert done.stdout.startswith("usage: hf-elsa prune")
    assert "publisher trust" not in done.stderr and "gemm_4bit_forward" not in done.stderr, done.stderr


def test_ddp_does_not_search_for_unused_parameters_by_default(tmp_path):
    """transformers turns None into find_unused_parameters=True (a graph traversal per step, and a warning per rank
    that none was found); every weight of a causal LM is used, so ElsaConfig says False. True stays possible."""
    from transformers import Trainer

    from hf_elsa import ElsaConfig

    args = ElsaConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.ddp_find_unused_parameters is False
    trainer = Trainer(model=make_model("llama"), args=args)
    assert trainer._build_accelerator_args()["kwargs_handlers"][0].find_unused_parameters is False
    assert ElsaConfig(output_dir=str(tmp_path), ddp_find_unused_parameters=True).ddp_find_unused_parameters is True


# -- one test per dated workaround of hf_elsa.compat: each fails the day upstream changes what it relies on ----------


def _trainer(tmp_path, **overrides):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, **overrides)
    return Trainer(model=make_model("llama"), args=args)


def test_checkpoint_step_reads_the_step_a_trainer_checkpoint_records(tmp_path):
    """compat.TRAINER_STATE_NAME / checkpoint_step: the file and key the Trainer writes into every checkpoint."""
    import transformers.trainer
    from conftest import lm_dataset

    from hf_elsa.compat import TRAINER_STATE_NAME, checkpoint_step

    assert transformers.trainer.TRAINER_STATE_NAME == TRAINER_STATE_NAME
    trainer = _trainer(tmp_path, max_steps=2, save_steps=2, save_strategy="steps", per_device_train_batch_size=2)
    trainer.train_dataset = lm_dataset(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    assert checkpoint_step(str(tmp_path / "checkpoint-2")) == 2
    assert checkpoint_step(str(tmp_path)) is None and checkpoint_step(None) is None
    (tmp_path / TRAINER_STATE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        checkpoint_step(str(tmp_path))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_is_the_kernel_the_model_was_built_with(implementation):
    """compat.attention_implementation reads config._attn_implementation (private in transformers 5.x)."""
    from conftest import _config
    from transformers import LlamaForCausalLM

    from hf_elsa.compat import attention_implementation

    model = LlamaForCausalLM._from_config(_config("llama"), attn_implementation=implementation)
    assert attention_implementation(model) == implementation
    assert attention_implementation(torch.nn.Linear(2, 2)) is None


def test_dcp_state_init_call_is_recognised_in_torchs_own_init():
    """compat.is_dcp_state_init_call: torch.distributed.checkpoint initialises an empty optimizer's state by a step()
    with zero gradients at lr 0 (a private function of torch 2.x); an ordinary step is not mistaken for it."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    from hf_elsa.compat import is_dcp_state_init_call

    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(is_dcp_state_init_call(self))
            return super().step(closure)

    layer = torch.nn.Linear(4, 4)
    optimizer = Recording(layer.parameters(), lr=1e-3)
    _init_optim_state(optimizer)
    assert seen == [True] and optimizer.state  # the state now exists, so no later step looks like it
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert seen == [True, False]


def test_prepare_inputs_moves_a_batch_as_the_training_loop_does(tmp_path):
    """compat.prepare_inputs calls Trainer._prepare_inputs (private in transformers 5.x)."""
    from hf_elsa.compat import prepare_inputs

    trainer = _trainer(tmp_path)
    batch = prepare_inputs(trainer, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert batch["input_ids"].device == trainer.args.device


def test_loss_scale_is_the_factor_compute_loss_applies(tmp_path, monkeypatch):
    """compat.loss_scale mirrors Trainer.compute_loss's rescaling under average_tokens_across_devices: measured here
    with 4 pretended processes, against compute_loss itself."""
    from hf_elsa.compat import loss_scale

    trainer = _trainer(tmp_path, average_tokens_across_devices=True)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 4))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    items = torch.tensor(14)
    with torch.no_grad():
        plain = trainer.model(**inputs, num_items_in_batch=items).loss
        scaled = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items)
    assert loss_scale(trainer, items) == 4
    torch.testing.assert_close(scaled, plain * loss_scale(trainer, items))
    assert loss_scale(trainer, None) == 1.0


def test_supported_transformers_range_is_the_tested_one():
    """setup.py installs version.TRANSFORMERS_REQUIREMENT, the range this suite runs on; outside it, one warning."""
    from pathlib import Path

    import pytest
    import transformers
    from packaging.requirements import Requirement

    from hf_elsa import version

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert 'version["TRANSFORMERS_REQUIREMENT"]' in setup and '"transformers>=' not in setup
    spec = Requirement(version.TRANSFORMERS_REQUIREMENT).specifier
    assert spec.contains(transformers.__version__), "the suite runs on a transformers outside the declared range"
    assert version.check_transformers_version() is True
    version._WARNED_VERSIONS.discard("99.0.0")
    with pytest.warns(UserWarning, match=r"tested with transformers>=5\.0,<5\.26; transformers 99\.0\.0"):
        assert version.check_transformers_version("99.0.0") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert version.check_transformers_version("99.0.0") is False  # once per process

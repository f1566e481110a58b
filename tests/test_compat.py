"""hf_elsa.compat: the private/renamed transformers touch points, each against the installed version."""

import warnings

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

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

"""hf_elsa.perplexity against exp(mean NLL) computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hf_elsa import perplexity


def _by_hand(model, ids: torch.Tensor, seqlen: int) -> float:
    """exp(mean token NLL) over non-overlapping windows, via the model's own loss (labels=...)."""
    n = ids.numel() // seqlen
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            loss = model(input_ids=window, labels=window).loss  # mean over seqlen - 1 predictions
            total += float(loss) * (seqlen - 1)
            count += seqlen - 1
    return math.exp(total / count)


@pytest.fixture
def model(model_factory):
    return model_factory("llama", seed=3).eval()


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_of_ids_matches_hand_computation(model, batch_size):
    ids = torch.randint(0, 128, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    expected = _by_hand(model, ids, 16)
    got = perplexity(model, text=ids, seqlen=16, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)
    # a random model is close to uniform over 128 tokens, far from 1
    assert 50 < got < 400


def test_perplexity_of_string_and_documents(model, char_tokenizer):
    docs = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"]
    text = "\n\n".join(docs)
    ids = torch.tensor(char_tokenizer(text, add_special_tokens=False)["input_ids"])
    expected = _by_hand(model, ids, 16)
    assert perplexity(model, char_tokenizer, text, seqlen=16) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, char_tokenizer, docs, seqlen=16) == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_training_mode(model):
    model.train()
    perplexity(model, text=torch.arange(64) % 128, seqlen=16)
    assert model.training


def test_text_shorter_than_seqlen_raises(model, char_tokenizer):
    with pytest.raises(ValueError):
        perplexity(model, char_tokenizer, "short", seqlen=16)
    with pytest.raises(ValueError):
        perplexity(model, text=torch.arange(10), seqlen=16)


def test_max_windows_limits_the_windows(model):
    ids = torch.randint(0, 128, (5 * 16,), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, text=ids, seqlen=16, max_windows=2) == pytest.approx(
        _by_hand(model, ids[:32], 16), rel=1e-5
    )

"""Evaluation: the papers' perplexity protocol (docs/algorithm.md)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    text: str | Iterable[str] | torch.Tensor | None = None,
    seqlen: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    separator: str = "\n\n",
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on ``text`` (papers' protocol).

    The text (a string, a list of documents joined with ``separator``, or already tokenized ids) is
    tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the incomplete tail is
    dropped); the result is ``exp`` of the mean next-token negative log-likelihood over all windows.
    """
    if seqlen < 2:
        raise ValueError(f"perplexity: seqlen={seqlen} must be >= 2.")
    if isinstance(text, torch.Tensor):
        ids = text.reshape(-1)
    else:
        if tokenizer is None:
            raise ValueError("perplexity: pass a tokenizer when text is not already token ids.")
        if not isinstance(text, str):
            text = separator.join(text)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"perplexity: the text has {ids.numel()} tokens, fewer than seqlen={seqlen}.")
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)

"""Data helpers: fixed-length token blocks and document-level splits."""

from __future__ import annotations

import pytest
import torch

from hf_elsa.data import split_documents, token_blocks


def _stream(n=103, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _is_window(block: torch.Tensor, ids: torch.Tensor) -> bool:
    size = block.numel()
    return any(torch.equal(ids[s : s + size], block) for s in range(ids.numel() - size + 1))


def test_non_overlapping_blocks_from_ids():
    ids = _stream(103)
    ds = token_blocks(ids, block_size=16)
    assert len(ds) == 103 // 16
    for i, row in enumerate(ds):
        assert row["input_ids"].shape == (16,)
        assert torch.equal(row["input_ids"], ids[i * 16 : (i + 1) * 16])
        assert torch.equal(row["labels"], row["input_ids"])


def test_random_windows_are_seeded_and_contiguous():
    ids = _stream(200)
    a = token_blocks(ids, block_size=16, num_blocks=6, seed=3)[:]
    b = token_blocks(ids, block_size=16, num_blocks=6, seed=3)[:]
    c = token_blocks(ids, block_size=16, num_blocks=6, seed=4)[:]
    assert a["input_ids"].shape == (6, 16)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert torch.equal(a["labels"], a["input_ids"])
    for block in a["input_ids"]:
        assert block.shape == (16,)
        assert _is_window(block, ids)


def test_blocks_from_documents_with_tokenizer(char_tokenizer):
    docs = ["hello world", "second doc here", "x" * 30]
    ds = token_blocks(docs, char_tokenizer, block_size=8)
    stream = []
    for d in docs:
        stream += char_tokenizer(d, add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    stream = torch.tensor(stream)
    assert len(ds) == stream.numel() // 8
    rows = ds[:]
    assert torch.equal(rows["input_ids"].reshape(-1), stream[: len(ds) * 8])
    assert torch.equal(rows["labels"], rows["input_ids"])


def test_too_short_stream_raises():
    with pytest.raises(ValueError):
        token_blocks(_stream(10), block_size=16)


def test_split_documents_by_document_and_deterministic():
    docs = [f"document number {i}" for i in range(40)]
    train, held = split_documents(docs, eval_fraction=0.2, seed=7)
    assert len(held) == 8 and len(train) == 32
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(docs)
    assert split_documents(docs, eval_fraction=0.2, seed=7) == (train, held)
    assert split_documents(docs, eval_fraction=0.2, seed=8)[1] != held


def test_split_documents_holds_out_at_least_one():
    train, held = split_documents(["a", "b", "c"], eval_fraction=0.01, seed=0)
    assert len(held) == 1 and len(train) == 2

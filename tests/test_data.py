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


# ---------------------------------------------------------------------------------------------------
# held-out splits for the command line, text packing for the trainer
# ---------------------------------------------------------------------------------------------------
def test_split_text_by_documents_when_there_are_enough(char_tokenizer):
    from hf_elsa.data import split_text, tokenize_documents

    docs = [f"document {i} " * 5 for i in range(20)]
    split = split_text(docs, char_tokenizer, eval_fraction=0.1)
    train, held = split_documents(docs, eval_fraction=0.1, seed=0)
    assert torch.equal(split.eval, tokenize_documents(held, char_tokenizer))
    assert torch.equal(split.train, tokenize_documents(train, char_tokenizer))


def test_split_text_by_tokens_for_one_document(char_tokenizer):
    from hf_elsa.data import split_text, tokenize_documents

    ids = tokenize_documents(["x" * 199], char_tokenizer)  # 200 tokens with EOS
    split = split_text(["x" * 199], char_tokenizer, eval_fraction=0.1)
    assert split.eval.numel() == 20 and torch.equal(torch.cat([split.train, split.eval]), ids)
    nothing = split_text(["x" * 199], char_tokenizer, eval_fraction=0.0)
    assert nothing.eval is None and torch.equal(nothing.train, ids)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), 2])
def test_eval_fraction_is_checked(value, char_tokenizer):
    from hf_elsa.data import split_text

    with pytest.raises(ValueError, match="--eval_fraction"):
        split_text(["abc"], char_tokenizer, eval_fraction=value)


def test_choose_split():
    from hf_elsa.data import choose_split

    assert choose_split(["train"], None) == "train"
    assert choose_split(["train", "test", "validation"], None) == "test"
    assert choose_split(["train", "test"], "train") == "train"
    with pytest.raises(ValueError, match="--dataset_split"):
        choose_split(["train", "validation"], None)
    with pytest.raises(ValueError, match="no split 'test'"):
        choose_split(["train"], "test")


def test_pack_text_dataset_text_and_chat(char_tokenizer):
    from datasets import Dataset, IterableDataset

    from hf_elsa.data import pack_text_dataset, tokenize_documents

    texts = ["hello world", "second example here", "x" * 30]
    packed = pack_text_dataset(Dataset.from_dict({"text": texts, "id": [1, 2, 3]}), char_tokenizer, block_size=8)
    stream = tokenize_documents(texts, char_tokenizer)
    assert packed.column_names == ["input_ids", "labels"]
    assert torch.equal(packed[:]["input_ids"].reshape(-1), stream[: len(packed) * 8])
    assert len(packed) == stream.numel() // 8
    streamed = pack_text_dataset(IterableDataset.from_generator(lambda: ({"text": t} for t in texts)),
                                 char_tokenizer, block_size=8)  # fmt: skip
    assert [list(r["input_ids"]) for r in streamed] == packed[:]["input_ids"].tolist()

    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
    )
    with pytest.raises(ValueError, match="chat template"):
        pack_text_dataset(chat, char_tokenizer, block_size=4)
    tok = char_tokenizer.__class__(tokenizer_object=char_tokenizer.backend_tokenizer, eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = pack_text_dataset(chat, tok, block_size=4)[:]["input_ids"].reshape(-1)
    expected = tokenize_documents(["user: hi\nassistant: yo\n"], tok)
    assert torch.equal(rows, expected[: rows.numel()]) and rows.numel() == expected.numel() // 4 * 4
    with pytest.raises(ValueError, match="fewer tokens than one block"):
        pack_text_dataset(Dataset.from_dict({"text": ["ab"]}), char_tokenizer, block_size=8)

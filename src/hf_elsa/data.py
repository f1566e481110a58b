"""Text -> fixed-length token blocks for training, calibration and evaluation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from datasets import Dataset

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wikipedia_sample(min_chars: int = 500) -> list[str]:
    """The real English Wikipedia articles shipped with gensim's test data (105 articles, ~3.1M chars).

    Needs ``gensim`` (``pip install hf_elsa[demo]``); no network.
    """
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The Wikipedia sample ships with gensim: pip install 'hf_elsa[demo]'.") from exc
    import bz2

    articles = []
    with bz2.open(datapath(WIKI_SAMPLE), "rb") as dump:
        for title, text, _ in extract_pages(dump):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = filter_wiki(text).strip()
            if len(body) >= min_chars:
                articles.append(f"{title}\n\n{body}")
    return articles


def split_documents(documents: Sequence[str], eval_fraction: float = 0.1, seed: int = 0):
    """Split documents (not tokens) into train and held-back eval lists, seeded."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(documents) * eval_fraction))
    eval_ids = set(order[:n_eval])
    train = [d for i, d in enumerate(documents) if i not in eval_ids]
    held = [d for i, d in enumerate(documents) if i in eval_ids]
    return train, held


def tokenize_documents(documents: Sequence[str], tokenizer) -> torch.Tensor:
    """One token stream: each document's ids followed by the EOS token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    documents: Sequence[str] | torch.Tensor,
    tokenizer=None,
    block_size: int = 256,
    num_blocks: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A ``datasets.Dataset`` of ``{"input_ids", "labels"}`` blocks of ``block_size`` tokens.

    Without ``num_blocks``: every non-overlapping block of the stream. With ``num_blocks``: that many
    windows at random (seeded) offsets, as calibration sets are drawn in the papers.
    """
    ids = documents if isinstance(documents, torch.Tensor) else tokenize_documents(documents, tokenizer)
    if ids.numel() < block_size:
        raise ValueError(f"token_blocks: {ids.numel()} tokens is less than block_size={block_size}.")
    if num_blocks is None:
        n = ids.numel() // block_size
        blocks = ids[: n * block_size].reshape(n, block_size)
    else:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - block_size + 1, (num_blocks,), generator=gen)
        blocks = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    return Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()}).with_format("torch")


def load_documents(
    text_files: Sequence[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> list[str]:
    """Documents from plain text files (one document per file) or a ``datasets`` dataset.

    ``dataset`` is a Hub name or a local path/loader name (``"json"``, ``"csv"``, a folder...), read
    with ``datasets.load_dataset``; local files need no Hub access. Without either argument: the
    embedded Wikipedia sample (:func:`wikipedia_sample`).
    """
    if text_files and dataset:
        raise ValueError("Pass text files or a dataset, not both.")
    if text_files:
        documents = []
        for path in text_files:
            with open(path, encoding="utf-8") as f:
                documents.append(f.read())
        return documents
    if dataset:
        from datasets import load_dataset

        data = load_dataset(dataset, dataset_config, split=split)
        if text_column not in data.column_names:
            raise ValueError(f"dataset {dataset!r} has no column {text_column!r}; columns: {data.column_names}.")
        return [t for t in data[text_column] if t and t.strip()]
    return wikipedia_sample()

"""Text -> fixed-length token blocks for training, calibration and evaluation."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset

from ._messages import shorten


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


# builders of ``datasets.load_dataset`` for local files, by extension (``--data_files`` without ``--dataset_name``)
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text", ".parquet": "parquet"}


def load_documents(
    text_files: Sequence[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str | None = "train",
    text_column: str = "text",
    data_files: str | Sequence[str] | None = None,
) -> list[str]:
    """Documents from plain text files (one document per file) or a ``datasets`` dataset.

    ``dataset`` is a Hub name, a local folder or a builder name (``"json"``, ``"csv"``, ``"text"``,
    ``"parquet"``) read with ``datasets.load_dataset(dataset, dataset_config, data_files=data_files)``;
    ``data_files`` alone picks the builder from the file extension. ``split=None`` takes the only split
    of the dataset, or ``"test"`` when it has several (see :func:`choose_split`).
    """
    if text_files and (dataset or data_files):
        raise ValueError("Pass text files or a dataset (--dataset_name / --data_files), not both.")
    if isinstance(text_files, (str, os.PathLike)):  # one file, not its characters
        text_files = [text_files]
    if text_files:
        return [read_text_file(path) for path in text_files]
    if dataset or data_files:
        data = load_text_dataset(dataset, dataset_config, split, data_files)
        source = shorten(dataset or data_files)
        if text_column not in data.column_names:
            raise ValueError(
                f"dataset {source} has no column {shorten(text_column)} (--dataset_text_field); "
                f"its columns: {shorten(data.column_names, 400)}."
            )
        return text_rows(data[text_column], text_column, source)
    raise ValueError(
        "load_documents needs text_files or a dataset; the embedded Wikipedia sample is "
        "hf_elsa.showcase.demo.wikipedia_sample()."
    )


def read_text_file(path: str | os.PathLike) -> str:
    """One ``--text_files`` document; a folder, a missing file or a file that is not UTF-8 text is a clear error."""
    if os.path.isdir(path):
        raise ValueError(f"text file {shorten(os.fspath(path))} is a folder: pass the files in it (e.g. folder/*.txt).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {shorten(os.fspath(path))} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}): --text_files takes plain text; a binary file is not text, and a text file in another "
            "encoding converts with e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`."
        ) from None


def text_rows(values: Sequence, column: str, source: str) -> list[str]:
    """The non-empty strings of a text column; a column of numbers or other values is refused, naming it."""
    documents = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(
                f"dataset {source}: column {shorten(column)} holds {type(value).__name__} values (e.g. "
                f"{shorten(value)}), not text: choose the text column with --dataset_text_field."
            )
        if value.strip():
            documents.append(value)
    return documents


def load_text_dataset(
    dataset: str | None,
    dataset_config: str | None = None,
    split: str | None = "train",
    data_files: str | Sequence[str] | None = None,
):
    """One split of a ``datasets`` dataset, with errors that name the command-line flag to fix."""
    from datasets import load_dataset

    if dataset_config and (os.path.sep in dataset_config or os.path.splitext(dataset_config)[1] in FILE_BUILDERS):
        raise ValueError(
            f"--dataset_config {shorten(dataset_config)} is a configuration name, not a file: pass data files with "
            f"--data_files {dataset_config}."
        )
    if dataset is None:
        files = [data_files] if isinstance(data_files, str) else list(data_files or [])
        extensions = {os.path.splitext(f)[1].lower() for f in files}
        builders = {FILE_BUILDERS.get(ext) for ext in extensions}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"--data_files {files}: cannot tell the file format from the extensions {sorted(extensions)}; "
                f"pass --dataset_name with one of {sorted(set(FILE_BUILDERS.values()))}."
            )
        dataset = builders.pop()
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        missing = [f for f in files if "*" not in f and "://" not in f and not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"--data_files: file not found: {missing[0]}")
    data = load_dataset(dataset, dataset_config, data_files=data_files)
    return data[choose_split(list(data), split, dataset)]


def choose_split(available: Sequence[str], split: str | None, name: str | None = None) -> str:
    """``split`` if the dataset has it; for ``split=None`` its only split, or ``"test"`` among several."""
    if split is None:
        if len(available) == 1:
            return available[0]
        if "test" in available:
            return "test"
        raise ValueError(f"dataset {shorten(name)} has the splits {list(available)}: choose one with --dataset_split.")
    if split not in available:
        raise ValueError(
            f"dataset {shorten(name)} has no split {shorten(split)} (--dataset_split); its splits: {list(available)}."
        )
    return split


@dataclass
class TextSplit:
    """Token streams for training and held-out evaluation, and how they were split (for reports)."""

    train: torch.Tensor
    eval: torch.Tensor | None
    how: str


def split_text(
    documents: Sequence[str],
    tokenizer,
    eval_fraction: float = 0.1,
    seed: int = 0,
    eval_documents: Sequence[str] | None = None,
) -> TextSplit:
    """Tokenized train and held-out streams from ``documents``.

    - ``eval_documents`` given (an evaluation split): train on every document, evaluate on those.
    - ``eval_fraction == 0``: train on everything, no held-out text.
    - enough documents that ``round(n * eval_fraction) >= 1``: whole documents are held out
      (:func:`split_documents`, seeded), so no document is in both streams.
    - too few documents (one file, for example): the token stream is split, the last ``eval_fraction``
      of its tokens held out.
    """
    check_eval_fraction(eval_fraction)
    if eval_documents is not None:
        return TextSplit(
            tokenize_documents(documents, tokenizer),
            tokenize_documents(eval_documents, tokenizer),
            f"{len(documents)} training and {len(eval_documents)} evaluation documents",
        )
    if eval_fraction == 0:
        return TextSplit(tokenize_documents(documents, tokenizer), None, f"{len(documents)} documents, none held out")
    if round(len(documents) * eval_fraction) >= 1:
        train, held = split_documents(documents, eval_fraction=eval_fraction, seed=seed)
        return TextSplit(
            tokenize_documents(train, tokenizer),
            tokenize_documents(held, tokenizer),
            f"{len(held)} of {len(documents)} documents held out (seed {seed})",
        )
    ids = tokenize_documents(documents, tokenizer)
    n_eval = round(ids.numel() * eval_fraction)
    if n_eval < 2 or ids.numel() - n_eval < 1:
        raise ValueError(
            f"the text has {ids.numel()} tokens: too few to hold out --eval_fraction {eval_fraction} of them "
            "(pass more text, or --eval_fraction 0 to train on everything without evaluation)."
        )
    return TextSplit(
        ids[:-n_eval],
        ids[-n_eval:],
        f"{len(documents)} document(s): the last {n_eval} of {ids.numel()} tokens held out",
    )


def check_eval_fraction(value: float, flag: str = "--eval_fraction") -> None:
    """``0 <= value < 1`` (NaN refused), with an error that names the flag."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
        raise ValueError(f"{flag} {shorten(value)} must be in [0, 1): the share of the text held out for evaluation.")


def pack_text_dataset(
    dataset,
    tokenizer,
    block_size: int,
    text_field: str = "text",
    batch_size: int = 1000,
):
    """Tokenize a ``text`` (or chat ``messages``) column and pack it into ``{"input_ids", "labels"}`` blocks.

    TRL's habit for causal-LM training data: every example is tokenized, followed by the EOS token, the
    token streams of ``batch_size`` examples are concatenated and cut into blocks of ``block_size`` (the
    tail of each batch that does not fill a block is dropped). A ``messages`` column (lists of
    ``{"role", "content"}``) is rendered with the tokenizer's chat template first. Works on ``Dataset``
    and ``IterableDataset``.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset without known features: read them off the first example
        columns = list(next(iter(dataset), {}))
    columns = list(columns)
    if text_field in columns:
        field_name, chat = text_field, False
    elif "messages" in columns:
        field_name, chat = "messages", True
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("The dataset has a 'messages' column but the tokenizer has no chat template to render it.")
    else:
        raise ValueError(f"no {shorten(text_field)} or 'messages' column to tokenize; columns: {columns}.")
    if block_size < 2:
        raise ValueError(f"block size {block_size} must be >= 2.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def pack(batch):
        stream: list[int] = []
        for value in batch[field_name]:
            if chat:
                value = tokenizer.apply_chat_template(value, tokenize=False)
            if not value:
                continue
            stream.extend(tokenizer(value, add_special_tokens=False)["input_ids"])
            stream.extend(eos)
        n = len(stream) // block_size
        blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = dataset.map(pack, batched=True, batch_size=batch_size, remove_columns=columns)
    if hasattr(packed, "__len__") and len(packed) == 0:
        raise ValueError(
            f"the {shorten(field_name)} column holds fewer tokens than one block of {block_size}: pass more text or a "
            "smaller "
            "max_length."
        )
    return packed.with_format("torch") if hasattr(packed, "with_format") else packed

"""Loading a causal LM and its tokenizer from a folder or Hub id, with messages that name the problem.

Below the trainer and the command line alike: ``ElsaTrainer("org/model")`` and ``hf-elsa prune`` both load
through here, so neither has to import the other (the CLI layer sits above the trainer, never below it).
"""

from __future__ import annotations

import os

# files that make a folder a tokenizer folder (fast, slow/sentencepiece, BPE vocabularies)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def check_model_source(name: str, flag: str = "--model_name_or_path") -> None:
    """A missing local folder says so (transformers would complain about the form of a repo id)."""
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded):
        raise ValueError(f"{flag} {name}: is a file; pass the folder that holds config.json.")
    if looks_like_path(name) and not os.path.isdir(expanded):
        raise FileNotFoundError(f"{flag} {name}: folder not found.")
    if os.path.isdir(expanded) and not os.path.isfile(os.path.join(expanded, "config.json")):
        raise ValueError(f"{flag} {name}: the folder has no config.json, so it is not a saved model.")


def check_tokenizer_source(name: str, flag: str = "--model_name_or_path") -> None:
    """A local folder without tokenizer files says so (transformers would ask for sentencepiece)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded) and not any(os.path.isfile(os.path.join(expanded, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"{flag} {name}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): save it "
            "next to the model with tokenizer.save_pretrained(folder), or pass --tokenizer_name_or_path."
        )


def load_model(name: str, **from_pretrained_kwargs):
    """A causal LM from a folder or Hub id: sparse hf_elsa folders keep their masks (``load_sparse_model``)."""
    from transformers import AutoModelForCausalLM

    from .sparse_io import ELSA_CONFIG_NAME, load_sparse_model

    check_model_source(name)
    expanded = os.path.expanduser(name)
    if os.path.isfile(os.path.join(expanded, ELSA_CONFIG_NAME)):
        return load_sparse_model(expanded, **from_pretrained_kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(expanded, **from_pretrained_kwargs)
    except OSError as exc:
        if os.path.isdir(expanded):
            raise
        raise OSError(f"--model_name_or_path {name}: not a local folder, and as a Hub id: {exc}") from exc


def load_tokenizer(name: str, flag: str = "--model_name_or_path", **kwargs):
    """The tokenizer of a folder or Hub id (a local folder without tokenizer files is refused first)."""
    from transformers import AutoTokenizer

    check_tokenizer_source(name, flag)
    return AutoTokenizer.from_pretrained(os.path.expanduser(name), **kwargs)

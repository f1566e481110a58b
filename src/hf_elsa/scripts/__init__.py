"""What the ``hf-elsa`` command and ``examples/prune.py`` share: one argument set (:mod:`.arguments`) and the steps
of a run (:mod:`.run`)."""

from ..loading import check_model_source, load_model, load_tokenizer, looks_like_path
from .arguments import (
    DTYPES,
    EMBEDDED,
    METHODS,
    ONESHOT_METHODS,
    SAVE_DTYPES,
    DataArguments,
    ElsaArgumentParser,
    ModelArguments,
    RunArguments,
    TextColumnArguments,
    link_text_options,
)
from .run import (
    EvalWindows,
    PruneResult,
    block_length,
    eval_windows,
    load_model_and_tokenizer,
    load_text,
    record_evaluation,
    run_prune,
    train_blocks,
)

__all__ = [
    "DTYPES",
    "EMBEDDED",
    "METHODS",
    "ONESHOT_METHODS",
    "SAVE_DTYPES",
    "DataArguments",
    "ElsaArgumentParser",
    "EvalWindows",
    "ModelArguments",
    "PruneResult",
    "RunArguments",
    "TextColumnArguments",
    "block_length",
    "check_model_source",
    "eval_windows",
    "link_text_options",
    "load_model",
    "load_model_and_tokenizer",
    "load_text",
    "load_tokenizer",
    "looks_like_path",
    "record_evaluation",
    "run_prune",
    "train_blocks",
]

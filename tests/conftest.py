"""Shared fixtures and factories for the hf_elsa tests: tiny models, a char tokenizer, synthetic data.

Everything is fp32, seeded and offline (no hub access: tiny models are built from configs).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import logging

import pytest
import torch
import transformers
from architectures import ARCHITECTURES
from datasets import Dataset

import hf_elsa  # noqa: F401  (configures the hf_elsa logger, which the next line opens to caplog)

logging.getLogger("hf_elsa").propagate = True  # pytest's caplog listens at the root logger, in CI and locally

VOCAB = 128
SEQ = 16


# ---------------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------------
def _llama_config(hidden=32, intermediate=64, heads=4, kv_heads=2, tie=True, num_hidden_layers=2, vocab_size=VOCAB):
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def _config(arch: str, **overrides):
    """Llama with its own knobs; the other architectures from the table of tests/architectures.py, with
    ``overrides`` set on the config."""
    if arch == "llama":
        return _llama_config(**overrides)
    cfg = ARCHITECTURES[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


ARCHS = ("llama", "gpt2", "opt", "qwen2", "gemma2")


def make_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny fp32 causal LM of ``arch`` with seeded random weights (eager attention, eval-free)."""
    torch.manual_seed(seed)
    cfg = _config(arch, **overrides)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float()


@pytest.fixture
def model_factory():
    return make_model


def prunable_weights(model) -> dict[str, torch.Tensor]:
    """Independent reference of the default prunable set: every nn.Linear / Conv1D weight but the LM head.

    Returns ``{name: weight as (out_features, in_features)}`` (GPT-2 Conv1D transposed back).
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    out = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            out[name] = module.weight.detach()
        elif isinstance(module, Conv1D):
            out[name] = module.weight.detach().t()
    return out


@pytest.fixture
def prunable():
    return prunable_weights


# ---------------------------------------------------------------------------------------------------
# tokenizer (character level, built offline)
# ---------------------------------------------------------------------------------------------------
def make_char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


# ---------------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------------
def pattern_stream(n_tokens: int, seed: int = 0, vocab: int = VOCAB, jump: float = 0.05, perm_seed: int = 1234):
    """A learnable token stream: next = perm[current] (a fixed random permutation), with rare random jumps.

    The permutation is fixed by ``perm_seed`` (the same "language" for train and held-out data); ``seed``
    draws the starting points and jumps, so different seeds give disjoint-looking held-out streams.
    """
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(perm_seed))
    gen = torch.Generator().manual_seed(seed)
    jumps = torch.rand(n_tokens, generator=gen) < jump
    rand = torch.randint(0, vocab, (n_tokens,), generator=gen)
    ids = torch.empty(n_tokens, dtype=torch.long)
    ids[0] = rand[0]
    for i in range(1, n_tokens):
        ids[i] = rand[i] if jumps[i] else perm[ids[i - 1]]
    return ids


def lm_dataset(n_blocks: int = 32, seqlen: int = SEQ, seed: int = 0, **kwargs) -> Dataset:
    ids = pattern_stream(n_blocks * seqlen, seed=seed, **kwargs).reshape(n_blocks, seqlen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


@pytest.fixture
def dataset_factory():
    return lm_dataset


def elsa_args(tmp_path, **overrides):
    """A small, fast, CPU-only ElsaConfig for tiny-model tests, on the default recipe users get.

    The recipe's own fields (SparseGPT start, distillation from the dense model, its learning rate) are left at
    their defaults; only the run's size is small: 12 steps, and 16 calibration blocks for the warm start
    (tiny models and 48-block datasets). A test of the bare ADMM mechanics overrides ``admm_init="magnitude"`` (z0 =
    Proj(W), no one-shot pruning) or ``distill_weight=0`` (no teacher) itself, and says why.
    """
    from hf_elsa import ElsaConfig

    kwargs = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 12,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "admm_interval": 2,
        "admm_init_samples": 16,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    kwargs.update(overrides)
    return ElsaConfig(**kwargs)


@pytest.fixture
def make_args(tmp_path):
    def factory(**overrides):
        return elsa_args(tmp_path, **overrides)

    return factory


# ---------------------------------------------------------------------------------------------------
# brute-force reference projection (Python sort over (score, index) pairs)
# ---------------------------------------------------------------------------------------------------
def _prune_group(scores: list[float], k: int) -> list[bool]:
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    pruned = set(order[:k])
    return [i not in pruned for i in range(len(scores))]


def ref_keep_mask(score: torch.Tensor, sparsity: float, sparsity_type: str) -> torch.Tensor:
    score = score.double()
    if sparsity_type == "unstructured":
        flat = score.reshape(-1).tolist()
        return torch.tensor(_prune_group(flat, round(len(flat) * sparsity))).reshape(score.shape)
    rows = score.reshape(score.shape[0], -1).tolist()
    out = []
    for row in rows:
        if sparsity_type == "row":
            out.append(_prune_group(row, round(len(row) * sparsity)))
        else:
            n, m = (int(x) for x in sparsity_type.split(":"))
            kept = []
            for start in range(0, len(row), m):
                kept += _prune_group(row[start : start + m], m - n)
            out.append(kept)
    return torch.tensor(out).reshape(score.shape)


def ref_project(values: torch.Tensor, sparsity: float, sparsity_type: str = "unstructured") -> torch.Tensor:
    """Magnitude projection by the brute-force rule."""
    return values * ref_keep_mask(values.abs(), sparsity, sparsity_type)


# ---------------------------------------------------------------------------------------------------
# running ElsaTrainer in tests
# ---------------------------------------------------------------------------------------------------
class StopAt(transformers.TrainerCallback):
    """Stop training after ``step`` optimizer steps (an interrupted run, for resume tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def train_quietly(model, args, dataset=None, resume=None, **kwargs):
    """``ElsaTrainer(...).train()`` on ``dataset`` (default 48 synthetic blocks) with warnings silenced."""
    import warnings

    from hf_elsa import ElsaTrainer

    with warnings.catch_warnings():  # the constructor's too (a short budget warns there)
        warnings.simplefilter("ignore", UserWarning)
        trainer = ElsaTrainer(model=model, args=args, train_dataset=dataset or lm_dataset(48), **kwargs)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def load_script(relative_path: str):
    """A script of the repository (e.g. ``"benchmarks/quality.py"``) imported as a module, for its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

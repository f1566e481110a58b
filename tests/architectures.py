"""Tiny causal LMs of the architectures users prune most, built from configs (no downloads).

One table, ``ARCHITECTURES``: name -> a config factory. Every model has a 128-token vocabulary, 2 decoder layers,
width 32 and 64 positions, fp32 weights seeded by ``make_architecture(name, seed)``, eager attention and no
dropout, so a few training steps run in about a second on a CPU core. ``pruned_modules`` names what hf_elsa
prunes in each (the table of docs/architectures.md is generated from it and checked against it).
"""

from __future__ import annotations

import re

import torch
import transformers

VOCAB = 128
WIDTH = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
# the ids of the special tokens must lie inside the tiny vocabulary
TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _decoder(config_class, **extra):
    """A Llama-style decoder config (grouped-query attention, gated MLP, tied embeddings)."""

    def build():
        return config_class(**WIDTH, **TOKENS, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True,
                            **extra)  # fmt: skip

    return build


ARCHITECTURES = {
    "llama": _decoder(transformers.LlamaConfig),
    "mistral": _decoder(transformers.MistralConfig, sliding_window=32),
    "qwen2": _decoder(transformers.Qwen2Config),
    "qwen3": _decoder(transformers.Qwen3Config, head_dim=8),
    "gemma2": _decoder(transformers.Gemma2Config, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "gemma3": _decoder(transformers.Gemma3TextConfig, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "phi3": _decoder(transformers.Phi3Config, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "opt": lambda: transformers.OPTConfig(
        **WIDTH,
        **TOKENS,
        ffn_dim=64,
        word_embed_proj_dim=32,
        tie_word_embeddings=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **WIDTH,
        **TOKENS,
        intermediate_size=64,
        rotary_pct=0.25,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def make_architecture(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny fp32 causal LM of ``name`` with seeded random weights and eager attention."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float()


def pruned_modules(model) -> list[str]:
    """What hf_elsa prunes by default, one entry per kind of module: ``self_attn.q_proj`` for every layer's."""
    from hf_elsa.targets import find_prunable_modules

    kinds = {re.sub(r"^.*?\.\d+\.", "", name) for name in find_prunable_modules(model)}
    return sorted(kinds)


def dense_modules(model) -> list[str]:
    """The weights left dense: embeddings, the LM head (tied or not) and the norms, one entry per kind."""
    from hf_elsa.targets import find_prunable_modules

    pruned = {f"{name}.weight" for name in find_prunable_modules(model)}
    kinds = {re.sub(r"^.*?\.\d+\.", "", name).removesuffix(".weight") for name, p in model.named_parameters()
             if name.endswith("weight") and name not in pruned}  # fmt: skip
    return sorted(kinds)

"""The dense teacher of distillation: which model it is, whether it fits the student, and its forward.

One rule (``ElsaTrainer``): the teacher is ``teacher_model=`` when given; otherwise the model entering ``train()``,
copied before the warm start prunes it, but only if that model is dense. A model that is already sparse (LoRA or
``keep_mask`` on a pruned model, a pruned checkpoint passed as ``model=``) is no teacher: the run then trains on the
next-token loss alone and says so. Everything a teacher must satisfy is checked here before any expensive step (its weights' finiteness by
``sparse_io.check_finite_weights``), and
its fingerprint goes into the optimizer state so that a resume cannot silently switch teachers.

Under FSDP2 the teacher is sharded like the student (``fully_shard`` per decoder layer and at the root, on the
student's mesh), frozen; :meth:`Teacher.forward` gathers it layer by layer and reshards after use.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from .admm.distributed import is_sharded, local
from .lora import is_peft_model

# Keys of the teacher's fingerprint in the optimizer state (python scalars: they survive every checkpoint format).
FINGERPRINT_KEYS = ("elsa_teacher_numel", "elsa_teacher_sum", "elsa_teacher_sumsq")
# A model with more exact zeros than this share of its prunable weights is taken as pruned: no default teacher.
# Dense pretrained weights have essentially none; a pruned one has its sparsity's share (>= 50% in practice).
SPARSE_ZERO_SHARE = 0.05


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (adapters stay injected: a PeftModel teacher keeps them)."""
    return model.get_base_model() if is_peft_model(model) else model


def sparse_reason(model: nn.Module, prunable: dict[str, nn.Module], keep_mask: bool) -> str | None:
    """Why ``model`` is already sparse (and so no dense teacher), ``None`` when it is dense."""
    from .sparse_io import get_sparsity

    if is_peft_model(model):
        return "it is a PeftModel (adapters trained on a sparse base)"
    if keep_mask:
        return "keep_mask=True (it is already pruned)"
    if get_sparsity(model) is not None:
        return "it carries hf_elsa sparsity masks (a pruned model)"
    total = sum(m.weight.numel() for m in prunable.values())
    zeros = sum(int((local(m.weight.detach()) == 0).sum()) for m in prunable.values())
    if total and zeros / total > SPARSE_ZERO_SHARE:
        return f"{zeros / total:.0%} of its prunable weights are exactly zero (a pruned checkpoint?)"
    return None


def dense_copy(student: nn.Module) -> nn.Module:
    """A frozen copy of the student as it is now (before the warm start prunes it)."""
    return copy.deepcopy(student).eval().requires_grad_(False)


def _width(model: nn.Module, which: str) -> int | None:
    module = _unwrap(model).get_output_embeddings() if which == "out" else _unwrap(model).get_input_embeddings()
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    # nn.Linear heads are (vocab, hidden), GPT-2-style Conv1D heads do not exist; embeddings are (vocab, hidden)
    return weight.shape[0]


def check_teacher(teacher: nn.Module, student: nn.Module, tokenizer, hidden_weight: float) -> None:
    """Refuse a teacher that cannot teach this student, naming what differs (before any forward)."""
    if teacher is student or _unwrap(teacher) is _unwrap(student):
        raise ValueError(
            "ElsaTrainer(teacher_model=...) is the student model itself: pruning would prune the teacher too. Pass a "
            "separate dense model (e.g. AutoModelForCausalLM.from_pretrained of the same checkpoint)."
        )
    meta = [n for n, p in teacher.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"teacher_model has {len(meta)} parameters on the meta device (e.g. {meta[0]!r}): load it with real "
            "weights (from_pretrained without device_map='meta' / init_empty_weights)."
        )
    s_vocab, t_vocab = _width(student, "out"), _width(teacher, "out")
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"teacher_model predicts {t_vocab} tokens, the student {s_vocab}: the KL compares the two distributions "
            "token by token, so both need the same vocabulary (resize one with resize_token_embeddings, or distil from "
            "a teacher of the same family)."
        )
    t_embed = _width(teacher, "in")
    if tokenizer is not None and t_embed is not None and len(tokenizer) > t_embed:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but teacher_model embeds only {t_embed}: token ids past "
            f"{t_embed - 1} would index outside its embedding. Use the teacher's tokenizer family."
        )
    if hidden_weight > 0:
        s_cfg, t_cfg = _unwrap(student).config, _unwrap(teacher).config
        s_shape = (s_cfg.get_text_config().num_hidden_layers, s_cfg.get_text_config().hidden_size)
        t_shape = (t_cfg.get_text_config().num_hidden_layers, t_cfg.get_text_config().hidden_size)
        if s_shape != t_shape:
            raise ValueError(
                f"distill_hidden_weight > 0 compares hidden states layer by layer, but the teacher has "
                f"{t_shape[0]} layers of width {t_shape[1]} and the student {s_shape[0]} of width {s_shape[1]}: set "
                "distill_hidden_weight=0 (logit distillation works across sizes) or use a teacher of the same shape."
            )


@torch.no_grad()
def fingerprint(teacher: nn.Module | None) -> dict[str, float | int]:
    """Size and fp64 sums of the teacher's weights (``numel = 0`` for no teacher): enough to tell two apart."""
    if teacher is None:
        return dict.fromkeys(FINGERPRINT_KEYS, 0)
    numel, total, squares = 0, 0.0, 0.0
    for p in teacher.parameters():
        values = local(p.detach()).double()
        numel, total, squares = numel + p.numel(), total + float(values.sum()), squares + float(values.square().sum())
    return dict(zip(FINGERPRINT_KEYS, (numel, total, squares)))


def same_fingerprint(a: dict, b: dict) -> bool:
    if int(a[FINGERPRINT_KEYS[0]]) != int(b[FINGERPRINT_KEYS[0]]):
        return False
    return all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) for k in FINGERPRINT_KEYS[1:])


def describe(print_: dict) -> str:
    if not print_[FINGERPRINT_KEYS[0]]:
        return "no teacher (distillation off)"
    return f"a teacher of {int(print_['elsa_teacher_numel']):,} weights with checksum {print_['elsa_teacher_sum']:.6g}"


class Teacher:
    """A frozen teacher next to the student: its final hidden states and its head, chunk by chunk."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.causal_lm = _unwrap(model)
        self.backbone = self.causal_lm.base_model
        self.head = self.causal_lm.get_output_embeddings()
        self.softcap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        self.placed = self.sharded = False

    def place(self, student: nn.Module, device: torch.device) -> None:
        """Put the teacher where the (prepared) student is, once: sharded on its mesh under FSDP2 (each decoder
        layer moved to the device and sharded in turn), on its device otherwise."""
        if self.placed:
            return
        self.placed = True
        mesh = next((p.device_mesh for p in student.parameters() if is_sharded(p)), None)
        if mesh is None:
            self.model.to(device)
            return
        from torch.distributed.fsdp import fully_shard

        from .oneshot._sequential import find_decoder_layers

        for layer in find_decoder_layers(self.causal_lm) or ():
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(self.causal_lm, mesh=mesh, reshard_after_forward=True)
        self.sharded = True

    @contextlib.contextmanager
    def gathered_root(self):
        """Under FSDP2 the root's own weights (embeddings, final norm, head) stay gathered while the teacher is used:
        the backbone and head are called directly, without the root forward that would gather them."""
        if not self.sharded:
            yield
            return
        self.causal_lm.unshard()
        try:
            yield
        finally:
            self.causal_lm.reshard()

    def forward(self, inputs: dict, hidden_states: bool):
        return self.backbone(**inputs, output_hidden_states=hidden_states)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits

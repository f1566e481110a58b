"""Distillation from the dense model: the math (pure functions; the trainer only wires them in).

- :func:`chunked_kl`: ``sum over tokens of KL(p_teacher || p_student)`` over the full vocabulary at a
  temperature, computed in chunks of tokens. Each chunk's fp32 log-softmaxes exist only inside the call, and the
  backward recomputes the softmaxes chunk by chunk for the closed-form gradient, so the peak memory is one chunk,
  not a second fp32 ``[tokens, vocab]`` copy.
- :func:`hidden_state_loss`: SquareHead's per-layer hidden-state loss, ``sum_l ||h_s - h_t||^2 / ||h_t||^2``
  (Kurtic et al., *Sparse Fine-tuning for Inference Acceleration of Large Language Models*, arXiv 2310.06927),
  which stays stable at high sparsity where logit distillation alone overfits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in fp32, without a copy at temperature 1 (each pass over ``[rows, vocab]`` counts)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class _KLSum(torch.autograd.Function):
    """``sum_rows KL(softmax(teacher / T) || softmax(student / T))`` in fp32, with its gradient in closed form:
    ``(softmax(student / T) - softmax(teacher / T)) / T``. Only the inputs are kept for the backward pass, which
    recomputes the two softmaxes: a second fp32 ``[rows, vocab]`` copy never outlives the call, and the backward
    does not replay the forward's graph (0.51x the time of the checkpointed plain expression at T = 1, 0.74x at
    T = 2, on a CPU core: benchmarks/distill_kl.py)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        log_q = F.log_softmax(_scaled(student, temperature), dim=-1)
        log_p = F.log_softmax(_scaled(teacher, temperature), dim=-1)
        # both through the same log_softmax: a teacher equal to the student gives exactly 0
        return torch.linalg.vecdot(log_p.exp(), log_p - log_q).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        temperature = ctx.temperature
        q = F.softmax(_scaled(student, temperature), dim=-1)
        p = F.softmax(_scaled(teacher, temperature), dim=-1)
        if torch.is_grad_enabled():  # a double backward (Hutchinson, Sassha) differentiates this: no in-place ops
            return ((q - p) * (grad / temperature)).to(student.dtype), None, None
        return q.sub_(p).mul_(grad / temperature).to(student.dtype), None, None


def chunked_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Callable[[slice], torch.Tensor],
    temperature: float = 1.0,
    rows: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Sum over rows of ``KL(p_teacher || p_student)`` at ``temperature`` (not multiplied by ``T^2``).

    ``student_logits``: ``[tokens, vocab]`` (any float dtype, with grad); ``rows``: the row indices to compare
    (default all). ``teacher_logits``: ``[len(rows), vocab]``, or a function returning the teacher's logits for a
    slice of ``rows`` (so the teacher's logits, too, exist one chunk at a time). Equal to the direct
    computation up to float rounding; the gradient flows to the student.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1.")
    if rows is None:
        rows = torch.arange(student_logits.shape[0], device=student_logits.device)
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_tokens):
        part = slice(start, min(start + chunk_tokens, len(rows)))
        with torch.no_grad():
            teacher = teacher_logits(part) if callable(teacher_logits) else teacher_logits[part]
        total = total + _KLSum.apply(student_logits[rows[part]], teacher.detach(), temperature)
    return total


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Sum over the tokens where ``mask`` is True of the mean over layers of ``||h_s - h_t||^2 / ||h_t||^2``.

    SquareHead's normalised hidden-state loss, normalised per token so that, like the next-token loss, it is a
    sum over tokens that the caller divides by the token count (exact under gradient accumulation).
    ``student_hidden`` / ``teacher_hidden``: one ``[batch, seq, hidden]`` tensor per layer output (the embedding
    output, index 0, is skipped: it is not pruned); ``mask``: ``[batch, seq]`` booleans.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states.")
    layers = len(student_hidden) - 1
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for h_s, h_t in zip(student_hidden[1:], teacher_hidden[1:]):
        s, t = h_s[mask].float(), h_t[mask].detach().float()
        total = total + ((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).sum()
    return total / max(layers, 1)


def next_token_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[batch, seq]`` booleans: the positions whose logits predict a next token that has a label."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask

"""Time of the distillation KL (forward + backward) against the checkpointed plain expression it replaced, in one run.

    python benchmarks/distill_kl.py [--tokens 1024] [--vocab 49152] [--repeats 5] [--threads 1]

``hf_elsa.distillation.chunked_kl`` computes ``sum_rows KL(p_teacher || p_student)`` with a closed-form gradient;
the reference is the same sum written with ``log_softmax`` and differentiated by autograd through
``torch.utils.checkpoint`` (one chunk's fp32 intermediates at a time, as before). Both run interleaved on the same
fp32 logits (SmolLM2's vocabulary by default, one packed batch of 4 x 256 tokens with the last position of each row
left out); the medians and their ratio are printed, with the largest difference of the loss and of the gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_elsa.distillation import chunked_kl


def _plain_kl_sum(student, teacher, temperature):
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def reference_kl(student_logits, teacher_logits, temperature, rows, chunk_tokens=1024):
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(rows), chunk_tokens):
        part = slice(start, min(start + chunk_tokens, len(rows)))
        student = student_logits[rows[part]]
        total = total + checkpoint(_plain_kl_sum, student, teacher_logits[part], temperature, use_reentrant=False)
    return total


def _timed(fn, student, teacher, temperature, rows):
    student.grad = None
    start = time.perf_counter()
    loss = fn(student, teacher, temperature, rows=rows)
    loss.backward()
    return time.perf_counter() - start, float(loss.detach()), student.grad.clone()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sequence", type=int, default=256, help="tokens per row (its last one has no label)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, generator=gen).mul_(3).requires_grad_(True)
    mask = torch.ones(args.tokens, dtype=torch.bool)
    mask[args.sequence - 1 :: args.sequence] = False
    rows = mask.nonzero().squeeze(1)
    teacher = torch.randn(len(rows), args.vocab, generator=gen).mul_(3)
    for temperature in (1.0, 2.0):
        times = {"reference": [], "chunked_kl": []}
        for _ in range(args.repeats):
            t_ref, loss_ref, grad_ref = _timed(reference_kl, student, teacher, temperature, rows)
            t_new, loss_new, grad_new = _timed(chunked_kl, student, teacher, temperature, rows)
            times["reference"].append(t_ref)
            times["chunked_kl"].append(t_new)
        ref, new = statistics.median(times["reference"]), statistics.median(times["chunked_kl"])
        print(
            f"T={temperature:g}: checkpointed plain KL {ref:.3f} s, chunked_kl {new:.3f} s, ratio {new / ref:.2f} "
            f"(loss rel. diff {abs(loss_new - loss_ref) / abs(loss_ref):.1e}, "
            f"grad max diff {(grad_new - grad_ref).abs().max().item():.1e}; {len(rows)} x {args.vocab} fp32, "
            f"{args.threads} thread(s), median of {args.repeats})"
        )


if __name__ == "__main__":
    main()

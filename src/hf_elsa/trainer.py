"""``ElsaTrainer``: a ``transformers.Trainer`` that prunes while it trains.

Thin glue over public Trainer hooks. The algorithm lives in :class:`hf_elsa.admm.ElsaOptimizer`,
which wraps whatever optimizer the Trainer builds; this class only

- picks the prunable weights and validates them and the teacher before any expensive work (``__init__``),
- at ``train()`` entry takes the dense teacher (``hf_elsa.teacher``) and runs the one-shot warm start once,
  split over the processes, before the Trainer's loop and its progress bar,
- wraps the optimizer (``create_optimizer``) and tells it the run length (``create_scheduler``),
- zeroes pruned gradients before clipping in the fixed-mask phase (``training_step``),
- at the last micro-batch of each accumulation window: refreshes the Hutchinson curvature, and for SAM
  (``sam_rho``) or Sassha replays the window at the perturbed point (``_after_accumulation``),
- adds the ADMM diagnostics to the logs (``log``) and perplexity to the eval metrics (``evaluation_loop``),
- checks and reports the result when training ends (``train``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ._logging import follow_log_level, get_logger
from .admm import ElsaOptimizer
from .compat import checkpoint_step, loss_scale, prepare_inputs
from .config import ElsaConfig
from .curvature import (
    all_reduce_mean,
    check_double_backward,
    double_backward_attention,
    get_estimator,
    hutchinson_diagonal,
    probe_generator,
)
from .distillation import chunked_kl, hidden_state_loss, next_token_mask
from .flatness import Sassha, perturbed, sam_perturbation
from .inference import sparse_layers
from .lora import is_peft_model, prepare_peft_model
from .sparse_io import (
    attach_sparsity,
    check_finite_weights,
    detach_sparsity,
    get_sparsity,
    record_evaluation,
    sparsity_metadata,
    sparsity_report,
    write_model_card,
)
from .targets import find_prunable_modules, is_transposed
from .teacher import Teacher, check_teacher, dense_copy, describe, fingerprint, same_fingerprint, sparse_reason
from .trainer_inputs import frozen_weights_message, prepare_trainer_inputs, warn_short_budget

logger = get_logger(__name__)

# Share of the prunable weights' norm that the final hard projection may remove before we warn that
# ADMM had not converged. The paper recipe at 150 steps removes ~100% (residual ~1.0);
# the default recipe removes ~7% on SmolLM2 at 70% and ends 7.7x better than masked fine-tuning.
UNCONVERGED_WARNING = 0.10


def _has_optimizer_state(checkpoint: str) -> bool:
    """Whether a Trainer checkpoint folder holds optimizer state (one file, or a sharded FSDP folder)."""
    return any(name.startswith("optimizer") for name in os.listdir(checkpoint))


class ElsaTrainer(Trainer):
    """Trainer for ELSA pruning. Takes every ``Trainer`` argument; ``args`` must be an [`ElsaConfig`].

    After ``train()`` every prunable weight of ``trainer.model`` is exactly sparse (see
    ``ElsaConfig.final_projection``) and ``trainer.elsa_optimizer.masks()`` holds the masks.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: ElsaConfig | None = None,
        *pargs,
        teacher_model: nn.Module | None = None,
        **kwargs,
    ):
        if args is None:
            args = ElsaConfig(output_dir="elsa_output")
        if not isinstance(args, ElsaConfig):
            raise TypeError(f"ElsaTrainer needs args=ElsaConfig(...), got {type(args).__name__}.")
        # TRL's habits: a model id or folder, peft_config=, text/chat datasets (hf_elsa.trainer_inputs)
        model = prepare_trainer_inputs(model, args, kwargs)
        follow_log_level(args)
        converted = list(sparse_layers(model)) if isinstance(model, nn.Module) else []
        if converted:
            raise ValueError(
                f"ElsaTrainer: {len(converted)} layers of the model (e.g. {converted[0]!r}) were converted by "
                "hf_elsa.to_sparse_inference for inference and cannot train; call "
                "hf_elsa.from_sparse_inference(model) first."
            )
        # A PEFT model: its LoRA adapters train on the frozen sparse base, no ADMM; the masks are re-applied
        # when the adapters are merged (hf_elsa.lora.merge_and_unload).
        self.lora = prepare_peft_model(model, args) if is_peft_model(model) else None
        # Fail fast on bad targets, before the Trainer moves the model or builds anything.
        self.prunable_modules = (
            self.lora.modules
            if self.lora is not None
            else find_prunable_modules(model, args.target_modules, args.exclude_modules, args.sparsity_type)
        )
        frozen = [name for name, module in self.prunable_modules.items() if not module.weight.requires_grad]
        if frozen and self.lora is None:
            raise ValueError(frozen_weights_message(model, frozen))
        if self.lora is None:
            warn_short_budget(args, kwargs.get("train_dataset"))
        if args.keep_mask and not any(bool((m.weight == 0).any()) for m in self.prunable_modules.values()):
            raise ValueError("ElsaConfig.keep_mask=True but the model has no zero weights to keep: prune it first.")
        if args.load_best_model_at_end and self.lora is None and not args.keep_mask and args.admm_fraction >= 1:
            raise ValueError(
                f"ElsaConfig.load_best_model_at_end=True with admm_fraction={args.admm_fraction}: the mask is fixed only "
                "after the last step, so every earlier checkpoint is a dense mid-ADMM one and none can be the best "
                "sparse model. Use admm_fraction < 1 (recipe='elsa'), or load_best_model_at_end=False."
            )
        if get_estimator(args.importance).needs_double_backward:
            check_double_backward(model, f"ElsaConfig.importance={args.importance!r}")
        if args.base_optimizer == "sassha":
            check_double_backward(model, "ElsaConfig.base_optimizer='sassha'")
            optimizers = kwargs.get("optimizers") or (None, None)
            if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
                raise ValueError(
                    "ElsaConfig.base_optimizer='sassha' builds the optimizer itself: do not pass optimizers= or "
                    "optimizer_cls_and_kwargs= to ElsaTrainer (or keep base_optimizer='trainer' to use yours)."
                )
        tokenizer = kwargs.get("processing_class")
        if teacher_model is not None and not args.distills:
            raise ValueError(
                "ElsaTrainer(teacher_model=...) was given but distillation is off (distill_weight=0 and "
                "distill_hidden_weight=0): set ElsaConfig(distill_weight=...) to learn from it, or drop teacher_model."
            )
        if teacher_model is not None:
            check_teacher(teacher_model, model, tokenizer, args.distill_hidden_weight)
        # the dense teacher of distillation (hf_elsa.teacher): this one, or the model entering train() if it is dense
        self.teacher_model = teacher_model
        self._teacher: Teacher | None = None
        self._teacher_fingerprint = fingerprint(None)
        self._start_masks: dict[str, torch.Tensor] = {}  # the warm start's (or the recorded) masks, for the optimizer
        self._resume_checked = False
        # distillation's loss parts, summed over the micro-batches of the optimizer steps since the last log
        self._distill_sums: dict[str, float] = {}
        self._distill_steps = 0  # optimizer steps since the last log
        self._replaying = False  # SAM's second pass: its loss is not the step's loss and is not logged
        if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token  # as TRL does: the padding collator needs one
        self.elsa_optimizer: ElsaOptimizer | None = None
        self._activation_hooks = None  # the curvature estimator's forward hooks (estimator.forward_hooks)
        self._sam_window: list[tuple[dict, object]] = []  # micro-batches of the current window, for the replay
        super().__init__(model, args, *pargs, **kwargs)

    # -- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.lora is not None:  # LoRA keep-mask mode: the Trainer's optimizer over the adapters, no ADMM
            return super().create_optimizer(model)
        if self.optimizer is None and self.args.base_optimizer == "sassha":
            # the Trainer's own parameter groups (weight decay off for biases and norms), Sassha as the class
            self.optimizer_cls_and_kwargs = (Sassha, self._sassha_kwargs())
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, ElsaOptimizer):
            prunable = {name: module.weight for name, module in self.prunable_modules.items()}
            transposed = {name for name, module in self.prunable_modules.items() if is_transposed(module)}
            self.optimizer = ElsaOptimizer(optimizer, prunable, self.args, transposed=transposed)
        self.elsa_optimizer = self.optimizer
        if self._activation_hooks is None:  # the estimator's forward hooks, if it collects statistics that way
            opt = self.elsa_optimizer
            self._activation_hooks = opt.estimator.forward_hooks(self.prunable_modules, opt.state_for, opt.transposed)
        if self._start_masks and not self.elsa_optimizer.state:
            self.elsa_optimizer.set_initial_masks(self._start_masks)
        return self.optimizer

    def _recorded_masks(self) -> dict[str, torch.Tensor]:
        """keep_mask on an hf_elsa model: its recorded masks, not its zeros (a kept weight may round to 0)."""
        attached = get_sparsity(self.model)
        if not self.args.keep_mask or attached is None:
            return {}
        return {
            name: attached.mask(f"{name}.weight", device=module.weight.device)
            for name, module in self.prunable_modules.items()
            if f"{name}.weight" in attached.masks
        }

    def _sassha_kwargs(self) -> dict:
        a = self.args
        return {
            "lr": a.learning_rate,
            "betas": (a.adam_beta1, a.adam_beta2),
            "eps": a.adam_epsilon,
            "weight_decay": a.weight_decay,
            "rho": a.sam_rho,
            "hessian_interval": a.hessian_interval,
            "seed": a.seed,
        }

    @property
    def sassha_optimizer(self) -> Sassha | None:
        """The Sassha base optimizer under the ADMM wrapper, if that is the x-step optimizer."""
        base = getattr(self.elsa_optimizer, "base_optimizer", None)
        return base if isinstance(base, Sassha) else None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.elsa_optimizer is None:  # LoRA keep-mask mode: no ADMM optimizer
            return super().create_scheduler(num_training_steps, optimizer)
        opt = self.elsa_optimizer
        if not opt.state:
            # after accelerate's prepare: under FSDP2 the weights are new (DTensor) parameters of the same modules
            opt.rebind({name: module.weight for name, module in self.prunable_modules.items()})
            opt.run_record.update(self._teacher_fingerprint)
        opt.start_run(num_training_steps, getattr(self, "_elsa_resume_step", None))
        return super().create_scheduler(num_training_steps, optimizer)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self._distill_steps += self.accelerator.sync_gradients  # the last micro-batch of an optimizer step
        if self.lora is not None:  # LoRA keep-mask mode: a plain step; the frozen base keeps its zeros
            return super().training_step(model, inputs, num_items_in_batch, **kwargs)
        if not self._resume_checked:  # the first step after the checkpoint (if any) was loaded
            self._resume_checked = True
            self._check_resumed_teacher()
            if self._elsa_resume_step:
                self.elsa_optimizer.check_masks_hold(f"resuming at step {self._elsa_resume_step}")
        # Initialise z0/u0 (or prune, for a run that starts with the mask fixed) before the first
        # forward; a no-op once the state exists, e.g. after a resume.
        self.elsa_optimizer.initialize()
        if self._activation_hooks is not None and self.elsa_optimizer.in_admm_phase:
            self._activation_hooks.attach()  # statistics are only needed while the mask can change
        elif self._activation_hooks is not None:
            self._activation_hooks.remove()
        loss = super().training_step(model, inputs, num_items_in_batch, **kwargs)
        self.elsa_optimizer.mask_gradients()
        if self.args.sam_rho > 0:
            self._sam_window.append((inputs, num_items_in_batch))
        # The Trainer sets sync_gradients for the last micro-batch of each accumulation window (the one after
        # which it clips and steps); a direct call outside the loop counts as a window of one.
        if self.accelerator.sync_gradients:
            window, self._sam_window = self._sam_window, []
            self._after_accumulation(model, inputs, window)
        return loss

    # -- curvature and flatness, once the window's gradient is complete ---------------------------
    def _after_accumulation(self, model, inputs, window) -> None:
        """Hutchinson refresh at x; SAM replay of ``window`` at x + e (Sassha's refresh there); x restored."""
        opt, sassha, args = self.elsa_optimizer, self.sassha_optimizer, self.args
        if (
            sassha is None
            and opt.in_admm_phase
            and opt.estimator.hessian_refresh_due(opt.steps_done, args.hessian_interval)
        ):
            self._refresh_hutchinson(model, inputs)
        sassha_due = sassha is not None and sassha.hessian_refresh_due()
        if args.sam_rho <= 0:
            if sassha_due:
                self._refresh_sassha(model, inputs, sassha)
            return
        params = [p for p in model.parameters() if p.grad is not None]
        perturbation = sam_perturbation([p.grad for p in params], args.sam_rho)
        with perturbed(params, perturbation), self._activation_statistics_paused():
            model.zero_grad(set_to_none=True)
            self._replay(model, window)
            if sassha_due:
                self._refresh_sassha(model, inputs, sassha)  # Sassha: the Hessian at the perturbed point
        opt.mask_gradients()

    def _replay(self, model, window) -> None:
        """Forward/backward of the stored micro-batches again, with the scaling and gradient sync of the first pass.

        ``num_items_in_batch`` and ``current_gradient_accumulation_steps`` are those of the same window, so the
        Trainer normalises the loss exactly as it did; DDP syncs only at the last micro-batch, as in the loop.
        """
        self._replaying = True
        try:
            for i, (micro_batch, num_items_in_batch) in enumerate(window):
                last = i == len(window) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, micro_batch, num_items_in_batch)
        finally:
            self._replaying = False

    @contextlib.contextmanager
    def _activation_statistics_paused(self):
        """Extra passes (replays, Hessian estimates) must not count towards the activation statistics."""
        hooks = self._activation_hooks
        attached = hooks is not None and hooks.attached
        if attached:
            hooks.remove()
        try:
            yield
        finally:
            if attached:
                hooks.attach()

    def _hessian_diagonal(self, model, inputs, params, generator) -> list[torch.Tensor]:
        """``|z * Hz|`` for one probe on this micro-batch's mean loss, averaged over processes.

        Computed on the unwrapped model (DDP does not synchronise a double backward), with SDPA forced
        to its math kernel (the fused kernels have no double backward).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        with self._activation_statistics_paused(), double_backward_attention(), self.compute_loss_context_manager():
            loss = self.compute_loss(unwrapped, prepare_inputs(self, inputs))
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            diagonal = hutchinson_diagonal(grads, params, generator)
        del loss, grads
        all_reduce_mean(diagonal)
        return diagonal

    def _refresh_hutchinson(self, model, inputs) -> None:
        opt = self.elsa_optimizer
        names = list(opt.prunable)
        params = [opt.prunable[n] for n in names]
        generator = probe_generator(self.args.seed, opt.estimator.refreshes(opt.state_for(names[0])), params[0].device)
        for name, diagonal in zip(names, self._hessian_diagonal(model, inputs, params, generator)):
            opt.estimator.on_hessian_diagonal(opt.state_for(name), diagonal, self.args.importance_beta)

    def _refresh_sassha(self, model, inputs, sassha: Sassha) -> None:
        params = [p for group in sassha.param_groups for p in group["params"] if p.requires_grad]
        diagonal = self._hessian_diagonal(model, inputs, params, sassha.probe_generator(params[0].device))
        sassha.update_hessian(dict(zip(params, diagonal)))

    @torch.no_grad()
    def _warm_start(self) -> dict[str, torch.Tensor]:
        """Prune with a one-shot pruner (``ElsaConfig.admm_init``): the run starts from its weights and mask.

        Runs once, at ``train()`` entry (never on resume), before the Trainer's loop: it has its own progress line.
        Under DDP / FSDP2 (before sharding) each process calibrates on its share of the blocks and the statistics
        are summed, so every process prunes alike and N processes give the masks of one. ADMM's z starts at the
        pruned weights and is free to move the mask; with ``admm_fraction=0`` the one-shot mask is kept.
        """
        method = self.args.admm_init
        if method == "magnitude" or self.args.keep_mask or self.lora is not None:
            return {}
        from .oneshot import PRUNERS

        pruner = PRUNERS.get(method)
        calibration = self._calibration_blocks(method) if pruner.requires_calibration else None
        processes = self.args.world_size
        dense_start = self.args.admm_init_sparsity  # a start at the target (its own value) is the usual start
        dense_start = dense_start if dense_start is not None and dense_start < self.args.final_sparsity else None
        blocks = (
            "" if calibration is None else f" on {len(calibration)} calibration blocks of {calibration.shape[1]} tokens"
        )
        split = f", split over {processes} processes" if processes > 1 and calibration is not None else ""
        denser = "" if dense_start is None else f", to sparsity {dense_start} (ADMM prunes the rest)"
        logger.info("hf_elsa: warm start: %s%s%s%s", method, blocks, split, denser)
        started = time.perf_counter()
        masks = pruner(
            self.accelerator.unwrap_model(self.model),
            calibration,
            # admm_init_sparsity: a denser start (unstructured under an N:M target) that ADMM's ramp prunes to the target
            sparsity=self.args.sparsity if dense_start is None else dense_start,
            sparsity_type=self.args.pattern if dense_start is None or self.args.pattern.can_ramp else "unstructured",
            target_modules=list(self.prunable_modules),
            progress=not self.args.disable_tqdm and self.is_local_process_zero(),
            execution_device=self.args.device,  # a model left on the CPU (FSDP before sharding): its layers run there
        )
        self.warm_start_seconds = time.perf_counter() - started
        logger.info("hf_elsa: warm start done in %.1f s; training starts", self.warm_start_seconds)
        return masks

    def _calibration_blocks(self, method: str) -> torch.Tensor:
        """The first ``admm_init_samples`` training blocks as ``[blocks, tokens]`` ids."""
        dataset = self.train_dataset
        count = min(self.args.admm_init_samples, len(dataset))
        try:  # a datasets.Dataset in one slice, any map-style dataset of {"input_ids": ...} items otherwise
            rows = (
                dataset[:count]["input_ids"]
                if hasattr(dataset, "column_names")
                else [dataset[i]["input_ids"] for i in range(count)]
            )
            return torch.stack([torch.as_tensor(row) for row in rows])
        except (KeyError, TypeError, IndexError, RuntimeError) as error:
            raise ValueError(
                f"ElsaConfig.admm_init={method!r} calibrates a one-shot pruner on training blocks: the train_dataset "
                f"must hold equal-length 'input_ids' blocks ({error}), or use admm_init='magnitude'."
            ) from None

    # -- distillation (hf_elsa.teacher, hf_elsa.distillation) ---------------------------------------
    def _prepare_teacher(self) -> None:
        """The dense teacher: ``teacher_model``, else a frozen copy of the model entering ``train()`` if it is dense."""
        self._teacher, teacher = None, self.teacher_model
        if self.args.distills and teacher is None:
            student = self.accelerator.unwrap_model(self.model)
            reason = sparse_reason(student, self.prunable_modules, self.args.keep_mask)
            if reason is None:
                teacher = self.teacher_model = dense_copy(student)  # kept: a second train() distils from it too
            else:
                logger.warning(
                    "hf_elsa: no distillation in this run: the model is not dense (%s), and a copy of it would be no "
                    "teacher. Pass ElsaTrainer(teacher_model=<the dense model>) to distil.",
                    reason,
                )
        if teacher is not None:
            check_finite_weights(teacher, "ElsaTrainer: the teacher")
            teacher.eval().requires_grad_(False)
            self._teacher = Teacher(teacher)
        self._teacher_fingerprint = fingerprint(teacher)

    def _check_resumed_teacher(self) -> None:
        """A resumed run distils from the teacher its checkpoint was trained with (or, like it, from none)."""
        opt = self.elsa_optimizer
        recorded = {key: opt.recorded(key) for key in self._teacher_fingerprint}
        if any(value is None for value in recorded.values()):
            return  # a new run, or a checkpoint written before teachers were recorded
        if not same_fingerprint(recorded, self._teacher_fingerprint):
            raise ValueError(
                f"This run resumes a checkpoint trained with {describe(recorded)}, but it has "
                f"{describe(self._teacher_fingerprint)}. Pass the same dense model: as teacher_model=, or as model= "
                "(the default teacher is a copy of a dense model= taken before the checkpoint is loaded)."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        a = self.args
        if self._teacher is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch, **kwargs)
        hidden = a.distill_hidden_weight > 0
        student_inputs = {**inputs, "output_hidden_states": True} if hidden else inputs
        ce, outputs = super().compute_loss(model, student_inputs, True, num_items_in_batch, **kwargs)
        mask = next_token_mask(inputs["labels"])
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        scale = loss_scale(self, num_items_in_batch) / count
        teacher = self._teacher
        teacher.place(model, self.args.device)
        base_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        rows = mask.flatten().nonzero().squeeze(1)
        loss, terms = (1.0 - a.distill_weight) * ce, {"loss_ce": ce.detach()}
        with teacher.gathered_root():
            with torch.no_grad(), self.accelerator.autocast():
                taught = teacher.forward(base_inputs, hidden)
            if a.distill_weight > 0:
                teacher_hidden = taught.last_hidden_state.flatten(0, 1)

                def teacher_logits(part):
                    with self.accelerator.autocast():
                        return teacher.logits(teacher_hidden[rows[part]])

                student_logits = outputs.logits.flatten(0, 1)
                kl = chunked_kl(student_logits, teacher_logits, a.distill_temperature, rows=rows)
                distill = kl * a.distill_temperature**2 * scale
                loss = loss + a.distill_weight * distill
                terms["loss_distill"] = distill.detach()
        if hidden:
            squarehead = hidden_state_loss(outputs.hidden_states, taught.hidden_states, mask) * scale
            loss = loss + a.distill_hidden_weight * squarehead
            terms["loss_hidden"] = squarehead.detach()
        if not self._replaying:
            for key, value in terms.items():
                self._distill_sums[key] = self._distill_sums.get(key, 0.0) + float(value)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args, **kwargs):
        # eval loss -> perplexity, as run_clm.py reports it; in the metrics themselves so that
        # callbacks and metric_for_best_model="eval_perplexity" see it
        output = super().evaluation_loop(*args, **kwargs)
        for key in [k for k in output.metrics if k.endswith("_loss")]:
            output.metrics[key.removesuffix("_loss") + "_perplexity"] = math.exp(min(output.metrics[key], 700.0))
        if get_sparsity(self.model) is not None and not self.model.training:
            # the next save writes the results into elsa_config.json and the model card
            protocol = "Trainer.evaluate(): mean token cross entropy over the eval_dataset's blocks, exp for perplexity"
            record_evaluation(self.model, output.metrics, protocol)
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.elsa_optimizer is not None and "loss" in logs:
            logs.update(self.elsa_optimizer.metrics)
        if "loss" in logs and self._distill_sums:
            # per optimizer step since the last log and averaged over processes, like the Trainer's loss
            steps = max(self._distill_steps, 1)
            keys = sorted(self._distill_sums)
            sums = torch.tensor([self._distill_sums[k] for k in keys], device=self.args.device, dtype=torch.float64)
            sums = self.accelerator.reduce(sums, reduction="mean")
            logs.update({key: float(value) / steps for key, value in zip(keys, sums)})
            self._distill_sums, self._distill_steps = {}, 0
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # Sharded (FSDP2) optimizer checkpoints load into a template of the state's keys, which depend on the
        # phase the checkpoint was written in (ElsaOptimizer.init_state): remember its step.
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._elsa_resume_step = checkpoint_step(checkpoint)
        if self._elsa_resume_step and not _has_optimizer_state(checkpoint):
            raise ValueError(
                f"{checkpoint} has no optimizer state (optimizer.pt): ADMM's z, u and masks live there, so the run "
                f"cannot resume from it at step {self._elsa_resume_step}. Start a new run from the model saved in it."
            )
        self._sam_window = []  # nothing left over from an interrupted run
        self._distill_sums, self._distill_steps = {}, 0
        self._resume_checked = False
        # before anything expensive: NaN/inf weights named here, not blamed on a singular calibration Hessian later
        self.args.validate()  # fields changed after construction are checked (and derived defaults follow) again
        check_finite_weights(self.accelerator.unwrap_model(self.model), "ElsaTrainer.train(): the model")
        self._prepare_teacher()  # before the warm start prunes the model the default teacher is copied from
        started = self.elsa_optimizer is not None and bool(self.elsa_optimizer.state)
        if not self._elsa_resume_step and not started:
            self._start_masks = self._warm_start() or self._recorded_masks()
            if self.elsa_optimizer is not None:
                self.elsa_optimizer.set_initial_masks(self._start_masks)
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self._activation_hooks is not None:
                self._activation_hooks.remove()
        # record the masks on the model: save_pretrained / push_to_hub then write sparse checkpoints
        if self.elsa_optimizer is not None and self.elsa_optimizer.masks():
            # exactly sparse whatever the loop left (load_best_model_at_end loads a checkpoint's weights)
            self.elsa_optimizer.apply_masks()
            attach_sparsity(self.model, self._full_masks(), sparsity_metadata(self.args))
        self._report_sparsity()
        return output

    def _determine_best_metric(self, metrics, trial) -> bool:
        # 2026-12, transformers 5.x private hook (Trainer._maybe_log_save_evaluate): with load_best_model_at_end
        # only checkpoints whose mask is fixed may become the best one; a mid-ADMM checkpoint is not sparse.
        if self.elsa_optimizer is not None and self.elsa_optimizer.in_admm_phase:
            return False
        return super()._determine_best_metric(metrics, trial)

    def _full_masks(self) -> dict[str, torch.Tensor]:
        """The optimizer's masks, each FSDP2-sharded one gathered whole (one at a time, kept on the CPU)."""
        masks = self.elsa_optimizer.masks()
        return {n: m.full_tensor().cpu() if hasattr(m, "full_tensor") else m for n, m in masks.items()}

    @torch.no_grad()
    def _report_sparsity(self) -> None:
        opt = self.elsa_optimizer
        if opt is None:
            return
        if opt.in_admm_phase:
            warnings.warn(
                "Training stopped inside the ADMM phase: the model is not sparse yet. Resume the run to finish it.",
                stacklevel=3,
            )
            return
        report = sparsity_report(self.model)  # over the masks attached by train()
        logger.info("hf_elsa: %d pruned tensors, sparsity %.4f", len(report.tensors), report.sparsity)
        # with no ADMM phase (admm_fraction=0, masked fine-tuning) the projection is the one-shot pruning itself
        if opt.admm_steps > 0 and opt.final_removed is not None and opt.final_removed > UNCONVERGED_WARNING:
            warnings.warn(
                f"ADMM had not converged when the mask was fixed: the hard projection removed "
                f"{100 * opt.final_removed:.1f}% of the prunable weights' norm, which usually costs a lot of "
                "quality. Give it more steps (max_steps) or a larger admm_lambda"
                + (", or use recipe='elsa', which converges in short runs." if self.args.recipe == "paper" else "."),
                stacklevel=3,
            )

    # -- sparse checkpoints (hf_elsa.sparse_io) --------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Every process calls save_model, only one calls _save: gather FSDP2-sharded masks here.
        opt = self.elsa_optimizer
        fixed = opt is not None and opt.masks() and not opt.in_admm_phase
        self._masks_to_save = self._full_masks() if fixed else None
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self._masks_to_save = None

    def _save(self, output_dir: str | None = None, state_dict=None, *args, **kwargs):
        # A save describes the masks the optimizer holds now: once the mask is fixed, checkpoints are sparse
        # folders; masks attached before the run (a loaded model being re-pruned) are stale while ADMM runs.
        opt = self.elsa_optimizer
        if opt is not None and opt.masks() and not opt.in_admm_phase:
            masks = getattr(self, "_masks_to_save", None) or opt.masks()
            attach_sparsity(self.model, masks, sparsity_metadata(self.args))
        elif opt is not None and get_sparsity(self.model) is not None:
            detach_sparsity(self.model)
        return super()._save(output_dir, state_dict, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """Our card (sparsity table, method, hyper-parameters) when the model carries masks, else the Trainer's."""
        if get_sparsity(self.model) is None or args or self.lora is not None:
            return super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return None
        card_kwargs = {k: kwargs.get(k) for k in ("tags", "model_name", "license", "language")}
        card_kwargs["datasets"] = kwargs.get("dataset") or kwargs.get("dataset_tags")
        card_kwargs["base_model"] = kwargs.get("finetuned_from")
        return write_model_card(self.model, self.args.output_dir, **card_kwargs)

"""ElsaTrainer end to end on tiny Hugging Face causal LMs (CPU, fp32, seeded)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import ARCHS, StopAt, lm_dataset, make_model, pattern_stream, prunable_weights, ref_project
from transformers import TrainerCallback, TrainingArguments

from hf_elsa import ElsaTrainer

ELSA_LOG_KEYS = ("elsa/lambda", "elsa/primal_residual", "elsa/mask_change", "elsa/weight_sparsity")


def _zero_counts(model, skip):
    return {n: int((p == 0).sum()) for n, p in model.named_parameters() if n not in skip}


def _prunable_param_names(model):
    names = set()
    for name in prunable_weights(model):
        names.add(f"{name}.weight")
    return names


def _train(model, args, dataset=None, **kwargs):
    trainer = ElsaTrainer(
        model=model, args=args, train_dataset=dataset if dataset is not None else lm_dataset(), **kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train()
    return trainer


def _assert_exactly_sparse(model, sparsity=0.7):
    weights = prunable_weights(model)
    assert weights
    for name, w in weights.items():
        assert int((w == 0).sum()) == round(w.numel() * sparsity), name


# ---------------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_prunes_every_architecture(arch, make_args):
    model = make_model(arch)
    skip = _prunable_param_names(model)
    zeros_before = _zero_counts(model, skip)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()

    trainer = _train(model, make_args(sparsity=0.7, max_steps=12))

    _assert_exactly_sparse(model, 0.7)
    # nothing else was pruned: no parameter outside the prunable set gained zeros
    zeros_after = _zero_counts(model, skip)
    for name, before in zeros_before.items():
        assert zeros_after[name] <= before, name
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert int((emb == 0).sum()) <= int((emb_before == 0).sum())
    assert int((head == 0).sum()) <= int((head_before == 0).sum())
    # the non-prunable parameters are trained too
    assert not torch.equal(emb.detach(), emb_before)
    # masks recorded for exactly the prunable weights
    masks = trainer.elsa_optimizer.masks()
    assert set(masks) == set(prunable_weights(model))
    # the diagnostics reach the Trainer's logs
    logged = set().union(*(entry.keys() for entry in trainer.state.log_history))
    for key in ELSA_LOG_KEYS:
        assert key in logged, key


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_embeddings_stay_tied_and_dense(arch, make_args):
    model = make_model(arch)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    _train(model, make_args(max_steps=8))
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert int((model.get_input_embeddings().weight == 0).sum()) == 0


def test_untied_lm_head_is_not_pruned(make_args):
    model = make_model("llama", tie=False)
    head_before = model.get_output_embeddings().weight.detach().clone()
    _train(model, make_args(max_steps=8))
    head = model.get_output_embeddings().weight
    assert int((head == 0).sum()) == 0
    assert not torch.equal(head.detach(), head_before)
    _assert_exactly_sparse(model)


# ---------------------------------------------------------------------------------------------------
# patterns
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,pattern", [("llama", "row"), ("llama", "2:4"), ("gpt2", "row"), ("gpt2", "2:4"), ("opt", "4:8")]
)
def test_structured_patterns(arch, pattern, make_args):
    model = make_model(arch)
    _train(model, make_args(sparsity=0.7, sparsity_type=pattern, max_steps=10))
    for name, w in prunable_weights(model).items():  # (out_features, in_features), Conv1D transposed back
        zeros = w == 0
        if pattern == "row":
            assert zeros.sum(dim=1).tolist() == [round(w.shape[1] * 0.7)] * w.shape[0], name
        else:
            n, m = (int(x) for x in pattern.split(":"))
            assert zeros.reshape(-1, m).sum(dim=1).tolist() == [m - n] * (w.numel() // m), name


# ---------------------------------------------------------------------------------------------------
# training options
# ---------------------------------------------------------------------------------------------------
def test_gradient_accumulation(make_args):
    model = make_model("llama")
    trainer = _train(model, make_args(max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert trainer.state.global_step == 8
    _assert_exactly_sparse(model)


def test_bf16_autocast(make_args):
    model = make_model("llama")
    _train(model, make_args(max_steps=8, bf16=True))
    for w in prunable_weights(model).values():
        assert w.dtype == torch.float32  # fp32 master weights
    _assert_exactly_sparse(model)


@pytest.mark.parametrize("recipe", ["paper", "elsa"])
def test_both_recipes_end_exactly_sparse(recipe, make_args):
    model = make_model("llama")
    trainer = _train(model, make_args(recipe=recipe, max_steps=10))
    _assert_exactly_sparse(model)
    assert not trainer.elsa_optimizer.in_admm_phase


def test_unconverged_run_warns(make_args):
    """The paper's constant small lambda on a 6-step run cannot converge: the user is told at the end."""
    model = make_model("llama")
    trainer = ElsaTrainer(
        model=model, args=make_args(recipe="paper", admm_lambda=1e-4, max_steps=6), train_dataset=lm_dataset()
    )
    with pytest.warns(UserWarning, match="converged"):
        trainer.train()
    _assert_exactly_sparse(model)


def test_penalty_is_added_after_clipping(make_args):
    """With the task gradient clipped to ~0 the penalty still moves W fully: W1 = W0 - lr * lambda (W0 - z0)."""
    model = make_model("llama")
    w0 = {n: w.clone() for n, w in prunable_weights(model).items()}
    args = make_args(
        recipe="paper",
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=1e-12,
        admm_lambda=1.0,
        admm_interval=100,
        max_steps=1,
        final_projection=False,
        warmup_steps=0,
    )
    _train(model, args)
    for name, w in prunable_weights(model).items():
        expected = w0[name] - 0.1 * 1.0 * (w0[name] - ref_project(w0[name], 0.7))
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-6, msg=name)


def test_target_and_exclude_modules(make_args):
    model = make_model("llama")
    _train(
        model,
        make_args(max_steps=8, target_modules=["q_proj", "down_proj"], exclude_modules=["layers.1.mlp.down_proj"]),
    )
    for name, w in prunable_weights(model).items():
        pruned = name.endswith("q_proj") or name == "model.layers.0.mlp.down_proj"
        zeros = int((w == 0).sum())
        assert zeros == (round(w.numel() * 0.7) if pruned else 0), name


def test_keep_mask_fine_tunes_a_sparse_model(make_args):
    model = make_model("llama")
    gen = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in prunable_weights(model):
                keep = torch.rand(module.weight.shape, generator=gen) > 0.5
                module.weight.mul_(keep)
                masks[name] = keep
    before = {n: w.clone() for n, w in prunable_weights(model).items()}
    _train(model, make_args(keep_mask=True, max_steps=8))
    for name, w in prunable_weights(model).items():
        assert torch.equal(w != 0, masks[name]), name
        assert not torch.equal(w, before[name]), name


def test_user_supplied_base_optimizer_is_wrapped(make_args):
    """`optimizers=(opt, None)`: ADMM wraps whatever base optimizer the Trainer is given."""

    class CountingSGD(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            type(self).steps += 1
            return super().step(closure)

    model = make_model("llama")
    base = CountingSGD(model.parameters(), lr=0.1)
    trainer = _train(model, make_args(max_steps=8), optimizers=(base, None))
    assert trainer.elsa_optimizer is not None and trainer.elsa_optimizer.base_optimizer is base
    assert CountingSGD.steps == 8  # the x-steps are the user's SGD steps, not an AdamW the Trainer built
    assert not any("exp_avg" in state for state in base.state.values())  # SGD without momentum keeps no state
    _assert_exactly_sparse(model)


def test_metrics_reach_callbacks(make_args):
    """Diagnostics go through Trainer.log, so every reporting callback (TensorBoard, W&B, ...) gets them."""

    class Recorder(TrainerCallback):
        def __init__(self):
            self.keys = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.keys.update(logs or {})

    recorder = Recorder()
    _train(make_model("llama"), make_args(max_steps=8, logging_steps=2), callbacks=[recorder])
    for key in ELSA_LOG_KEYS:
        assert key in recorder.keys, key


def test_importance_adam_with_trainer_optimizer(make_args):
    model = make_model("llama")
    _train(model, make_args(importance="adam", max_steps=10))
    _assert_exactly_sparse(model)


def test_epoch_based_run_knows_its_length(make_args):
    """max_steps unset: the run length comes from the epochs, and the model still ends exactly sparse."""
    model = make_model("llama")
    trainer = _train(model, make_args(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4), lm_dataset(32))
    assert trainer.state.global_step == 8
    _assert_exactly_sparse(model)


def test_admm_fraction_zero_is_magnitude_then_masked_finetune(make_args):
    model = make_model("llama")
    initial = {n: w.clone() for n, w in prunable_weights(model).items()}
    # the magnitude start (the bare mechanics): with no ADMM phase, the mask is the projection of W at step 0
    _train(model, make_args(admm_fraction=0.0, max_steps=6, admm_init="magnitude"))
    for name, w in prunable_weights(model).items():
        expected_zeros = ref_project(initial[name], 0.7) == 0
        assert torch.equal(w == 0, expected_zeros), name


def test_sparsity_zero_prunes_nothing(make_args):
    model = make_model("llama")
    _train(model, make_args(sparsity=0.0, max_steps=6))
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) == 0, name


# ---------------------------------------------------------------------------------------------------
# fail fast
# ---------------------------------------------------------------------------------------------------
def test_target_modules_matching_nothing(make_args):
    with pytest.raises(ValueError, match="target_modules"):
        ElsaTrainer(
            model=make_model("llama"), args=make_args(target_modules=["no_such_layer"]), train_dataset=lm_dataset(4)
        )


def test_nothing_left_to_prune(make_args):
    with pytest.raises(ValueError, match="nothing to prune"):
        ElsaTrainer(
            model=make_model("llama"),
            args=make_args(exclude_modules=["self_attn", "mlp", ".*"]),
            train_dataset=lm_dataset(4),
        )


def test_nm_on_indivisible_in_features(make_args):
    model = make_model("llama", hidden=30, intermediate=60, heads=3, kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        ElsaTrainer(model=model, args=make_args(sparsity_type="2:4"), train_dataset=lm_dataset(4))
    # the same model is fine unstructured
    ElsaTrainer(model=model, args=make_args(sparsity_type="unstructured"), train_dataset=lm_dataset(4))


def test_keep_mask_on_dense_model(make_args):
    with pytest.raises(ValueError, match="keep_mask"):
        ElsaTrainer(model=make_model("llama"), args=make_args(keep_mask=True), train_dataset=lm_dataset(4))


def test_args_must_be_elsa_config(tmp_path):
    with pytest.raises(TypeError):
        ElsaTrainer(
            model=make_model("llama"),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
            train_dataset=lm_dataset(4),
        )


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("elsa", {"admm_fraction": 0.75}),  # checkpoint inside the ADMM phase (z, u, lambda, step)
        ("elsa", {"admm_fraction": 0.25}),  # checkpoint in the fixed-mask phase (the mask)
        ("paper", {"admm_lambda": 0.5}),
        # Adam-curvature projection and gradient accumulation across the checkpoint
        ("elsa", {"importance": "adam", "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}),
        # estimator state (Fisher EMA; Hutchinson EMA and refresh count, which seeds the next probes)
        ("elsa", {"admm_fraction": 0.75, "importance": "fisher"}),
        ("elsa", {"admm_fraction": 0.75, "importance": "hutchinson", "hessian_interval": 4}),
        # Sassha's moments and Hessian estimate, with SAM replaying accumulated micro-batches
        (
            "elsa",
            {
                "admm_fraction": 0.75,
                "base_optimizer": "sassha",
                "importance": "hutchinson",
                "sam_rho": 0.01,
                "hessian_interval": 4,
                "gradient_accumulation_steps": 2,
                "per_device_train_batch_size": 2,
            },
        ),
    ],
    ids=[
        "elsa-admm-phase",
        "elsa-mask-phase",
        "paper",
        "adam-importance-accumulation",
        "fisher",
        "hutchinson",
        "sassha-sam-accumulation",
    ],
)
def test_resume_continues_exactly(recipe, extra, tmp_path):
    from conftest import elsa_args

    n = 12
    dataset = lm_dataset(48)
    common = dict(max_steps=n, recipe=recipe, admm_interval=2, learning_rate=3e-3, **extra)

    straight = make_model("llama", seed=0)
    _train(straight, elsa_args(tmp_path / "a", **common), dataset)

    interrupted = make_model("llama", seed=0)
    args_b = elsa_args(tmp_path / "b", save_strategy="steps", save_steps=n // 2, **common)
    _train(interrupted, args_b, dataset, callbacks=[StopAt(n // 2)])
    ckpt = tmp_path / "b" / "out" / f"checkpoint-{n // 2}"
    assert ckpt.is_dir()

    resumed = make_model("llama", seed=1)  # different init: everything must come from the checkpoint
    args_c = elsa_args(tmp_path / "c", **common)
    # but the teacher: checkpoints never hold it, so the run gets the dense model it distilled from
    teacher = {"teacher_model": make_model("llama", seed=0)} if args_c.distills else {}
    trainer = ElsaTrainer(model=resumed, args=args_c, train_dataset=dataset, **teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == n

    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    _assert_exactly_sparse(resumed)


# ---------------------------------------------------------------------------------------------------
# integration: ELSA beats one-shot magnitude pruning
# ---------------------------------------------------------------------------------------------------
def _eval_loss(model, ids):
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_elsa_beats_one_shot_magnitude(make_args):
    from datasets import Dataset

    torch.manual_seed(0)
    model = make_model("llama", seed=0, hidden=64, intermediate=128)
    train = pattern_stream(64 * 32 * 8, seed=0).reshape(-1, 32)
    held = pattern_stream(16 * 32, seed=99).reshape(-1, 32)  # same "language", other samples

    # dense pre-training (a few seconds)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(120):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    dense = _eval_loss(model, held)

    magnitude = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in magnitude.named_modules():
            if name in prunable_weights(magnitude):
                module.weight.copy_(ref_project(module.weight, 0.7))
    _assert_exactly_sparse(magnitude)
    magnitude_loss = _eval_loss(magnitude, held)

    elsa = copy.deepcopy(model)
    dataset = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()}).with_format("torch")
    _train(
        elsa,
        make_args(
            sparsity=0.7,
            max_steps=50,
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            admm_interval=4,
            logging_steps=25,
        ),
        dataset,
    )
    _assert_exactly_sparse(elsa)
    elsa_loss = _eval_loss(elsa, held)

    assert dense < magnitude_loss, "the pruning task is trivial: the test cannot tell methods apart"
    assert elsa_loss < magnitude_loss, f"dense {dense:.3f}, magnitude {magnitude_loss:.3f}, ELSA {elsa_loss:.3f}"


# ---------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------
def test_eval_reports_perplexity_equal_to_the_papers_protocol(make_args):
    """evaluate() adds eval_perplexity = exp(eval_loss); on equal-length blocks that is hf_elsa.perplexity."""
    from hf_elsa import perplexity

    model = make_model("llama")
    eval_set = lm_dataset(n_blocks=8, seed=5)
    trainer = _train(model, make_args(sparsity=0.5, max_steps=4, per_device_eval_batch_size=4), eval_dataset=eval_set)
    metrics = trainer.evaluate()

    blocks = eval_set[:]["input_ids"]
    expected = perplexity(model, text=blocks, seqlen=blocks.shape[1])
    assert metrics["eval_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)
    assert metrics["eval_perplexity"] > 1.0

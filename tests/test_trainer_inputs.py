"""TRL habits in ElsaTrainer: a model id or folder, text and chat columns, clear errors, the step budget."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lm_dataset, make_char_tokenizer, make_model, prunable_weights
from datasets import Dataset

from hf_elsa import ElsaTrainer
from hf_elsa.sparse_io import get_sparsity

TEXTS = [f"Example {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(12)]


def _assert_sparse(model, sparsity):
    for name, w in prunable_weights(model).items():
        assert int((w == 0).sum()) == round(w.numel() * sparsity), name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_model("llama").save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def test_model_id_string_and_text_column(folder, make_args):
    """TRL's habit: a folder (or Hub id) string, the tokenizer from the same place, a raw text column."""
    trainer = ElsaTrainer(model=str(folder), args=make_args(sparsity=0.5, max_steps=4, max_length=32),
                          train_dataset=Dataset.from_dict({"text": TEXTS}))  # fmt: skip
    assert trainer.model.dtype == torch.float32  # master weights; bf16=True would autocast
    assert trainer.processing_class is not None
    assert trainer.train_dataset.column_names == ["input_ids", "labels"]
    assert len(trainer.train_dataset[0]["input_ids"]) == 32
    trainer.train()  # the default recipe starts from SparseGPT: no 'had not converged' warning
    _assert_sparse(trainer.model, 0.5)


def test_model_init_kwargs_and_sparse_folder(folder, make_args, tmp_path):
    trainer = ElsaTrainer(model=str(folder), args=make_args(model_init_kwargs={"dtype": "bfloat16"}),
                          train_dataset=lm_dataset(8))  # fmt: skip
    assert trainer.model.dtype == torch.bfloat16
    # an hf_elsa sparse folder comes back with its masks (keep-mask fine-tuning works on it directly)
    first = ElsaTrainer(model=str(folder), args=make_args(sparsity=0.5, max_steps=4), train_dataset=lm_dataset(8))
    first.train()  # the default recipe starts from SparseGPT: no 'had not converged' warning
    first.model.save_pretrained(tmp_path / "sparse")
    make_char_tokenizer().save_pretrained(tmp_path / "sparse")
    again = ElsaTrainer(model=str(tmp_path / "sparse"), args=make_args(keep_mask=True, max_steps=2),
                        train_dataset=lm_dataset(8))  # fmt: skip
    assert get_sparsity(again.model) is not None


def test_missing_folder_says_so(make_args, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        ElsaTrainer(model=str(tmp_path / "nope"), args=make_args(), train_dataset=lm_dataset(4))


def test_chat_messages_through_the_chat_template(make_args):
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chats = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "answer " * 4}]
             for i in range(16)]  # fmt: skip
    trainer = ElsaTrainer(model=make_model("llama"), args=make_args(sparsity=0.5, max_steps=4, max_length=16),
                          train_dataset=Dataset.from_dict({"messages": chats}), processing_class=tokenizer)  # fmt: skip
    expected = tokenizer("user: question 0", add_special_tokens=False)["input_ids"]  # 16 characters
    assert trainer.train_dataset[0]["input_ids"].tolist() == expected
    trainer.train()  # the default recipe starts from SparseGPT: no 'had not converged' warning
    _assert_sparse(trainer.model, 0.5)


def test_trl_names_are_elsa_config_fields(make_args, tmp_path):
    """TRL's SFTConfig names are config fields: ElsaConfig(max_length=...) was a TypeError; bad values name the field."""
    from hf_elsa import ElsaConfig

    config = ElsaConfig(output_dir=str(tmp_path), max_length=64, dataset_text_field="body", packing=False,
                        model_init_kwargs='{"dtype": "bfloat16"}')  # fmt: skip
    assert (config.max_length, config.dataset_text_field, config.packing) == (64, "body", False)
    assert config.model_init_kwargs == {"dtype": "bfloat16"}  # a JSON string (command line, YAML) becomes a dict
    for bad, match in (({"max_length": 1}, "max_length=1 must be an integer >= 2"),
                       ({"dataset_text_field": ""}, "dataset_text_field='' must name a column"),
                       ({"model_init_kwargs": "bfloat16"}, "model_init_kwargs='bfloat16' must be a dict")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ElsaConfig(output_dir=str(tmp_path), **bad)
    trainer = ElsaTrainer(model=make_model("llama"), args=make_args(max_length=16, dataset_text_field="body"),
                          train_dataset=Dataset.from_dict({"body": TEXTS}), processing_class=make_char_tokenizer())  # fmt: skip
    assert (
        trainer.train_dataset.column_names == ["input_ids", "labels"]
        and len(trainer.train_dataset[0]["input_ids"]) == 16
    )


def test_trainer_keywords_still_work_with_a_future_warning(make_args):
    with pytest.warns(FutureWarning, match=r"ElsaConfig\(max_length=\.\.\.\)"):
        trainer = ElsaTrainer(model=make_model("llama"), args=make_args(), train_dataset=Dataset.from_dict({"text": TEXTS}),
                              processing_class=make_char_tokenizer(), max_length=16)  # fmt: skip
    assert len(trainer.train_dataset[0]["input_ids"]) == 16


def test_packing_false_one_example_per_row_truncated_and_padded(make_args):
    tokenizer = make_char_tokenizer()
    texts = ["short", "a much longer example that will be truncated at the row length", *TEXTS[:6]]
    trainer = ElsaTrainer(model=make_model("llama"), args=make_args(sparsity=0.5, max_steps=4, max_length=24,
                          packing=False), train_dataset=Dataset.from_dict({"text": texts}),
                          processing_class=tokenizer)  # fmt: skip
    rows = trainer.train_dataset
    assert len(rows) == len(texts) and rows.column_names == ["input_ids", "attention_mask", "labels"]
    short = tokenizer("short", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(short)
    assert rows[0]["input_ids"][:n].tolist() == short and rows[0]["attention_mask"].tolist() == [1] * n + [0] * (24 - n)
    assert rows[0]["labels"][n:].eq(-100).all()  # the padding is not learned
    long = tokenizer(texts[1], add_special_tokens=False)["input_ids"][:24]
    assert rows[1]["input_ids"].tolist() == long and rows[1]["attention_mask"].all()
    trainer.train()  # the default recipe starts from SparseGPT: no 'had not converged' warning
    _assert_sparse(trainer.model, 0.5)


def test_text_column_needs_a_tokenizer_and_other_columns_are_named(make_args):
    with pytest.raises(ValueError, match="processing_class"):
        ElsaTrainer(model=make_model("llama"), args=make_args(), train_dataset=Dataset.from_dict({"text": TEXTS}))
    with pytest.raises(ValueError, match="'input_ids'.*'text'.*'messages'"):
        ElsaTrainer(model=make_model("llama"), args=make_args(), train_dataset=Dataset.from_dict({"body": TEXTS}),
                    processing_class=make_char_tokenizer())  # fmt: skip


def test_eval_dataset_text_is_packed_too(make_args):
    trainer = ElsaTrainer(model=make_model("llama"), args=make_args(max_steps=2, admm_fraction=0.5, max_length=16),
                          train_dataset=lm_dataset(8), eval_dataset=Dataset.from_dict({"text": TEXTS}),
                          processing_class=make_char_tokenizer())  # fmt: skip
    assert "eval_perplexity" in trainer.evaluate()


def test_frozen_weights_message_without_peft(make_args):
    model = make_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen") as info:
        ElsaTrainer(model=model, args=make_args(), train_dataset=lm_dataset(4))
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "requires_grad_(True)" in message
    assert "peft.PeftModel" in message  # points LoRA users to the supported path


def test_step_budget_without_admm_phase_warns(make_args):
    # sparsity 0.5: the recipe's ADMM phase is 15% of the steps (30% from 80% up, with the denser start)
    with pytest.warns(UserWarning, match="0 ADMM steps: ELSA does not run, the weights are pruned by the sparsegpt"):
        ElsaTrainer(model=make_model("llama"), args=make_args(max_steps=2, sparsity=0.5), train_dataset=lm_dataset(8))
    # epochs: 8 blocks / batch 4 = 2 steps per epoch, 1 epoch -> round(0.15 * 2) = 0
    with pytest.warns(UserWarning, match="0 ADMM steps"):
        ElsaTrainer(model=make_model("llama"), args=make_args(max_steps=-1, num_train_epochs=1, sparsity=0.5),
                    train_dataset=lm_dataset(8))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ElsaTrainer(model=make_model("llama"), args=make_args(max_steps=12), train_dataset=lm_dataset(8))
        ElsaTrainer(model=make_model("llama"), args=make_args(max_steps=2, admm_fraction=0.0),
                    train_dataset=lm_dataset(8))  # fmt: skip

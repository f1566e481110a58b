"""Uploads to the Hub (hf_elsa.sparse_io.hub), with the Hub API patched."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub.errors import OfflineModeIsEnabled

from hf_elsa import ElsaTrainer
from hf_elsa.sparse_io import COMPRESSED_NAME, ELSA_CONFIG_NAME, MASKS_NAME

from .helpers import blocks, pruned_model, tiny_args, tiny_model

SPARSE_FILES = {"config.json", "generation_config.json", ELSA_CONFIG_NAME, MASKS_NAME, "README.md"}


@pytest.mark.parametrize("compressed", [False, True])
def test_save_pretrained_push_to_hub_uploads_the_sparse_checkpoint(compressed, fake_hub, tmp_path):
    model = pruned_model()
    model.save_pretrained(
        tmp_path / "m",
        compressed=compressed,
        push_to_hub=True,
        repo_id="me/tiny-sparse",
        private=True,
        commit_message="sparse!",
    )
    assert fake_hub["create_repo"][0]["repo_id"] == "me/tiny-sparse" and fake_hub["create_repo"][0]["private"]
    (upload,) = fake_hub["upload_folder"]
    weights = COMPRESSED_NAME if compressed else "model.safetensors"
    assert set(upload["files"]) == SPARSE_FILES | {weights}
    assert upload["repo_id"] == "me/tiny-sparse" and upload["commit_message"] == "sparse!"
    assert "model*.safetensors" in upload["delete_patterns"]  # a stale other format is removed on the Hub
    # the dense format loads with plain transformers; the compressed one needs hf_elsa
    assert f"library_name: {'hf_elsa' if compressed else 'transformers'}" in upload["texts"]["README.md"]
    assert json.loads(upload["texts"]["config.json"])["elsa_sparsity"]["format"] == (
        "compressed" if compressed else "dense"
    )


def test_model_push_to_hub_uploads_the_sparse_checkpoint(fake_hub):
    pruned_model().push_to_hub("me/tiny", compressed=True, tags=["demo"])
    (upload,) = fake_hub["upload_folder"]
    assert set(upload["files"]) == SPARSE_FILES | {COMPRESSED_NAME}
    assert "- demo" in upload["texts"]["README.md"]


def test_trainer_push_to_hub_uploads_masks_metadata_and_our_card(fake_hub, tmp_path):
    model = tiny_model()
    args = tiny_args(tmp_path, hub_model_id="me/elsa-tiny")
    trainer = ElsaTrainer(model=model, args=args, train_dataset=blocks())
    with pytest.warns(UserWarning):
        trainer.train()
    trainer.push_to_hub(dataset="random-tokens")
    assert fake_hub["create_repo"][0]["repo_id"] == "me/elsa-tiny"
    (upload,) = fake_hub["upload_folder"]
    assert SPARSE_FILES | {"model.safetensors"} <= set(upload["files"])
    card = huggingface_hub.ModelCard(upload["texts"]["README.md"])
    assert card.data.library_name == "transformers" and {"elsa", "sparse", "pruned", "hf_elsa"} <= set(card.data.tags)
    assert card.data.datasets == ["random-tokens"] and "admm_interval" in card.text
    meta = json.loads(upload["texts"][ELSA_CONFIG_NAME])
    assert meta["method"] == "elsa" and meta["hyperparameters"]["recipe"] == "elsa"


def test_push_offline_gives_a_clear_error(tmp_path):
    model = pruned_model()
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        model.save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="me/x")
    assert not (tmp_path / "m").exists()  # fails before writing anything
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        model.push_to_hub("me/x")
    trainer = ElsaTrainer(model=tiny_model(), args=tiny_args(tmp_path, hub_model_id="me/x"), train_dataset=blocks())
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        trainer.push_to_hub()

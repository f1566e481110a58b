"""The model card (hf_elsa.sparse_io.card)."""

from __future__ import annotations

import huggingface_hub

from hf_elsa.sparse_io.card import CARD_START

from .helpers import pruned_model


def test_user_readme_text_is_kept(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# My notes\n\nKeep this.\n")
    model = pruned_model()
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # the second save replaces only our section
    text = (folder / "README.md").read_text()
    card = huggingface_hub.ModelCard(text)
    assert "Keep this." in text and text.count(CARD_START) == 1
    assert card.data.license == "apache-2.0" and {"mine", "elsa"} <= set(card.data.tags)

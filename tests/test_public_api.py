"""Every ``hf_elsa.<name>`` that the docs, the README or a message names exists (``from_sparse_inference`` was named
but not exported), and ``__all__`` lists importable names."""

import importlib.util
import re
from pathlib import Path

import pytest

import hf_elsa

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.glob("src/hf_elsa/**/*.py"), *ROOT.glob("docs/**/*.md"), ROOT / "README.md"]


def _named() -> dict[str, str]:
    names = {}
    for path in SOURCES:
        for match in re.finditer(r"\bhf_elsa\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")):
            names.setdefault(match.group(1), str(path.relative_to(ROOT)))
    return names


@pytest.mark.parametrize("name,where", sorted(_named().items()))
def test_every_name_the_docs_and_messages_use_exists(name, where):
    exists = hasattr(hf_elsa, name) or importlib.util.find_spec(f"hf_elsa.{name}") is not None
    assert exists, f"{where} names hf_elsa.{name}, which is neither exported nor a module"


def test_all_lists_importable_names():
    assert all(hasattr(hf_elsa, name) for name in hf_elsa.__all__)
    assert {"from_sparse_inference", "to_sparse_inference"} <= set(hf_elsa.__all__)
    assert hf_elsa.from_sparse_inference is hf_elsa.inference.from_sparse_inference

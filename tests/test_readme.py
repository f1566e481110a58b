"""The README's quickstart runs as written (the embedded SmolLM2 and Wikipedia text, 10 steps)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section_code(title: str, language: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, f"no {language} block under '## {title}'"
    return blocks[0]


def test_readme_leads_with_make_demo_and_make_test():
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL).group(1)
    assert [line.split()[:2] for line in first.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


def test_install_section_pins_torch_before_the_package():
    install = _section_code("Install in your own environment", "bash")
    lines = [line for line in install.splitlines() if line.startswith("pip install")]
    assert lines[0].startswith("pip install torch==") and "download.pytorch.org/whl/cpu" in lines[0]
    assert "whl/cu" in install  # the GPU line


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_runs_every_command_with_the_given_python():
    """`make demo PYTHON=venv/bin/python` works without an activated environment: no bare console script."""
    python = "/nowhere/venv/bin/python"
    # run as make's own child too (`make test`): a sub-make inherits MAKELEVEL/MAKEFLAGS and prints "Entering directory"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", "demo", "test", "test-fast", f"PYTHON={python}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    commands = [line for line in dry.stdout.splitlines() if line.strip()]
    assert commands and all(line.startswith(f"{python} -m ") for line in commands), dry.stdout
    assert f"{python} -m hf_elsa demo" in commands


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gensim")
    from hf_elsa.showcase.demo import smollm2_gguf_folder

    try:
        smollm2_gguf_folder()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    monkeypatch.chdir(tmp_path)  # output_dir="smollm2-50" lands here
    exec(compile(_section_code("Quickstart", "python"), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "50.00% sparse" in out and "held-out perplexity:" in out
    assert (tmp_path / "smollm2-50" / "elsa_masks.safetensors").is_file()

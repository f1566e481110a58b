"""The import layering of hf_elsa is a contract (pyproject.toml's [tool.importlinter]): checked here, so CI fails on
an import that runs up a layer (e.g. the trainer importing the command line) or on a circle between layers."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports")
    assert command, "lint-imports not found: pip install -e '.[test]' (import-linter)"
    return subprocess.run([command, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_can_fail(tmp_path):
    """An import running up (the allocation layer importing the CLI) breaks the contract: the check is live."""
    config = (ROOT / "pyproject.toml").read_text()
    bad = tmp_path / "contract.toml"
    # the same contract with "allocation" moved above "cli": allocation does not import cli, but admm (then below
    # it) imports allocation, which now runs up
    layers = config.split("layers = [", 1)[1].split("]", 1)[0]
    moved = layers.replace('    "cli",\n', '    "cli",\n    "allocation",\n').replace(
        '"allocation | curvature', '"curvature'
    )
    bad.write_text(config.replace(layers, moved))
    result = _lint_imports("--config", str(bad))
    assert result.returncode != 0 and "hf_elsa.admm is not allowed to import hf_elsa.allocation" in result.stdout


def test_the_library_imports_without_the_command_line():
    """Importing hf_elsa (and training) never loads the CLI, the scripts or the showcase."""
    code = (
        "import sys, hf_elsa, hf_elsa.trainer; "
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['hf_elsa', 'cli'], ['hf_elsa', 'scripts'], ['hf_elsa', 'showcase'])))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_no_import_circle_anywhere_in_the_package():
    """No module of hf_elsa reaches itself through imports (lazy imports inside functions included): the contract
    above checks the layers, this also the modules within one layer."""
    import grimp

    graph = grimp.build_graph("hf_elsa")
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("hf_elsa") and graph.chain_exists(importer=imported, imported=module):
                circles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not circles, "\n".join(circles)

"""The model card (``README.md``) of a sparse checkpoint, built with ``huggingface_hub.ModelCard``.

Our section sits between two markers, so a user's own README text and metadata are kept on every save.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..version import __version__
from .formats import get_format
from .metadata import CARD_NAME, ElsaSparsityConfig
from .report import SparsityReport, TensorSparsity, report_from_config
from .state import measure, require_state

CARD_START, CARD_END = "<!-- hf_elsa:start -->", "<!-- hf_elsa:end -->"


def build_model_card(
    config: ElsaSparsityConfig,
    report: SparsityReport | None = None,
    *,
    tags: list[str] | str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
):
    """A ``huggingface_hub.ModelCard``: library_name hf_elsa, tags, base_model, sparsity table, method and
    hyper-parameters, evaluation protocol and results (``config.evaluation``) when known."""
    from huggingface_hub import ModelCard, ModelCardData

    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    all_tags = list(dict.fromkeys(["elsa", "sparse", "pruned", *extra_tags]))
    if config.sparsity_type and ":" in config.sparsity_type:
        all_tags.append(f"sparsity-{config.sparsity_type.replace(':', '-')}")
    data = ModelCardData(
        library_name="hf_elsa",
        tags=all_tags,
        base_model=config.base_model,
        pipeline_tag="text-generation",
        license=license,
        language=language,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
    )
    body = _card_body(config, report, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{CARD_START}\n{body}\n{CARD_END}\n")


def _card_body(config: ElsaSparsityConfig, report: SparsityReport | None, model_name: str | None) -> str:
    achieved = config.achieved_sparsity
    title = model_name or (f"{config.base_model.split('/')[-1]}, pruned" if config.base_model else "Sparse model")
    head = f"{100 * achieved:.1f}% sparse" if achieved is not None else "sparse"
    lines = [f"# {title} ({head})", ""]
    base = f" from [{config.base_model}](https://huggingface.co/{config.base_model})" if config.base_model else ""
    lines += [
        (
            f"Pruned{base} with [hf_elsa](https://pypi.org/project/hf-elsa/) (method: `{config.method or 'unknown'}`, "
            f"pattern: `{config.sparsity_type or 'unstructured'}`, target sparsity: {_pct(config.sparsity)}). "
            f"Checkpoint format: **{config.format}**."
        ),
        "",
        "## Loading",
        "",
        "```python",
        "import hf_elsa",
        'model = hf_elsa.load_sparse_model("REPO_OR_FOLDER")  # restores and checks the masks',
        "print(hf_elsa.sparsity_report(model))",
        "```",
        "",
    ]
    lines += get_format(config.format).card_loading_lines()
    lines += ["## Sparsity", ""]
    if report is not None and report.tensors:
        lines += _group_table(report)
        rows = "\n".join(f"| `{t.name}` | {'x'.join(map(str, t.shape))} | {_pct(t.sparsity)} |" for t in report.tensors)
        lines += [
            "",
            "<details><summary>Per tensor</summary>",
            "",
            "| tensor | shape | sparsity |",
            "|---|---|---|",
            rows,
            "",
            "</details>",
            "",
        ]
    lines += ["## Method and hyper-parameters", ""]
    settings = {
        "method": config.method,
        "sparsity": config.sparsity,
        "sparsity_type": config.sparsity_type,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        **config.hyperparameters,
    }
    lines += _kv_table(settings)
    if config.fine_tuning:
        lines += ["", "Mask-keeping fine-tuning (the zeros stay fixed):", ""] + _kv_table(config.fine_tuning)
    lines += ["", "## Evaluation", ""]
    evaluation = config.evaluation or {}
    if evaluation.get("protocol"):
        lines += [f"Protocol: {evaluation['protocol']}", ""]
    results = evaluation.get("results") or {}
    lines += _kv_table(results, ("metric", "value")) if results else ["Not evaluated yet."]
    lines += [
        "",
        f"_Written by hf_elsa {config.hf_elsa_version or __version__} (elsa format {config.elsa_format_version})._",
    ]
    return "\n".join(lines)


def _group_table(report: SparsityReport) -> list[str]:
    """Sparsity by layer type (``q_proj``, ``mlp.down_proj``, ...) and in total."""
    groups: dict[str, list[TensorSparsity]] = {}
    for t in report.tensors:
        parts = [p for p in t.name.split(".") if not p.isdigit() and p != "weight"]
        groups.setdefault(".".join(parts[-2:]) if len(parts) >= 2 else t.name, []).append(t)
    lines = ["| layers | tensors | weights | sparsity |", "|---|---|---|---|"]
    for name, ts in groups.items():
        numel, zeros = sum(t.numel for t in ts), sum(t.zeros for t in ts)
        lines.append(f"| `{name}` | {len(ts)} | {numel:,} | {_pct(zeros / max(numel, 1))} |")
    lines.append(f"| **all pruned** | {len(report.tensors)} | {report.numel:,} | **{_pct(report.sparsity)}** |")
    lines.append(f"| whole model | | {report.total_params:,} | {_pct(report.overall_sparsity)} |")
    return lines


def _kv_table(values: Mapping[str, Any], header=("setting", "value")) -> list[str]:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in values.items() if v is not None]
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def merge_card(existing: Path, ours: str) -> str:
    """Keep a user's own README text: replace only our marked section, or append it; merge the metadata."""
    if not existing.is_file():
        return ours
    from huggingface_hub import ModelCard, ModelCardData

    text = existing.read_text(encoding="utf-8")
    old, new = ModelCard(text), ModelCard(ours)
    old_body, new_body = old.text, new.text
    if CARD_START in old_body and CARD_END in old_body:
        before, _, rest = old_body.partition(CARD_START)
        _, _, after = rest.partition(CARD_END)
        body = before + new_body.strip() + after
    else:
        body = old_body.rstrip() + "\n\n" + new_body.strip() + "\n"
    data = old.data.to_dict()
    for key, value in new.data.to_dict().items():
        if key == "tags":
            data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *value]))
        elif value is not None:
            data[key] = value
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body.lstrip()}"


def write_model_card(model: nn.Module, folder: str | os.PathLike, **card_kwargs) -> Path:
    """Write (or update) ``README.md`` in ``folder`` for an attached model; used by ``ElsaTrainer``.

    ``card_kwargs``: ``tags``, ``model_name``, ``license``, ``language``, ``datasets`` and ``base_model``.
    """
    state = require_state(model)
    config = state.config
    if card_kwargs.get("base_model"):
        config.base_model = card_kwargs["base_model"]
    card_kwargs.pop("base_model", None)
    measure(state, model.state_dict(), "model card")  # the weights may have changed since the last save
    path = Path(folder) / CARD_NAME
    text = merge_card(path, str(build_model_card(config, report_from_config(config, model), **card_kwargs)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

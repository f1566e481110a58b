"""The model card (``README.md``) of a sparse checkpoint, built with ``huggingface_hub.ModelCard``.

Our section sits between two markers, so a user's own README text and metadata are kept on every save.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..version import __version__
from .formats import get_format
from .metadata import CARD_NAME, ELSA_CONFIG_NAME, ElsaSparsityConfig
from .report import SparsityReport, TensorSparsity, report_from_config
from .state import measure, require_state

CARD_START, CARD_END = "<!-- hf_elsa:start -->", "<!-- hf_elsa:end -->"


CITATION = """@inproceedings{lee2026unseen,
  title         = {The Unseen Frontier: Pushing the Limits of {LLM} Sparsity with Surrogate-Free {ADMM}},
  author        = {Lee, Kwanhee and Jang, Hyeondo and Lee, Dongyeop and Alistarh, Dan and Lee, Namhoon},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2510.01650},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2510.01650}
}"""
FRAMEWORKS = ("hf_elsa", "transformers", "torch", "accelerate", "datasets")
_PROTOCOL_FIELDS = ("dataset", "dataset_name", "dataset_config", "split", "revision")
# protocol keys that describe the run, not the evaluation dataset: shown in the card, not in model-index entries
TRAINING_DATA = "training_data"
# results of the dense model on the same windows (recorded beside the pruned model's): shown, not model-index entries
DENSE_PREFIX = "dense_"
UNIFORM_TOLERANCE = 1e-3  # tensors whose sparsities differ by less are "uniform" (rounding of per-tensor counts)
PAPER = "https://arxiv.org/abs/2510.01650"
_BAR = 40  # characters of a 100% bar in the per-layer chart


def build_model_card(
    config: ElsaSparsityConfig,
    report: SparsityReport | None = None,
    *,
    tags: list[str] | str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    eval_protocol: Mapping[str, Any] | str | None = None,
):
    """A ``huggingface_hub.ModelCard``: ``library_name`` of the format (``transformers`` for the dense format, which
    plain transformers loads; ``hf_elsa`` for the compressed one), tags, base_model, a per-layer sparsity chart and
    tables, method and hyper-parameters, evaluation protocol and results, framework versions and the citation.

    ``eval_results`` (``{metric: value}``) and ``eval_protocol`` default to ``config.evaluation`` (what
    :func:`record_evaluation` recorded); given, the results also become ``model-index`` entries of the metadata.
    """
    from huggingface_hub import ModelCard, ModelCardData

    fmt = get_format(config.format)
    evaluation = config.evaluation or {}
    results = dict(eval_results if eval_results is not None else evaluation.get("results") or {})
    protocol = eval_protocol if eval_protocol is not None else evaluation.get("protocol")
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    all_tags = list(dict.fromkeys(["elsa", "sparse", "pruned", "hf_elsa", *extra_tags]))
    if config.sparsity_type and ":" in config.sparsity_type:
        all_tags.append(f"sparsity-{config.sparsity_type.replace(':', '-')}")
    title = model_name or _title(config)
    model_index = _eval_results(results, protocol)
    data = ModelCardData(
        library_name=fmt.library_name,
        tags=all_tags,
        base_model=config.base_model,
        pipeline_tag="text-generation",
        license=license,
        language=language,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
        model_name=title if model_index else None,
        eval_results=model_index or None,
    )
    body = _card_body(config, report, title, results, protocol)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{CARD_START}\n{body}\n{CARD_END}\n")


def _title(config: ElsaSparsityConfig) -> str:
    if config.base_model:
        return f"{config.base_model.split('/')[-1]}, pruned"
    return f"A causal LM pruned with {config.method or 'hf_elsa'}"


def _eval_results(results: Mapping[str, Any], protocol: Mapping[str, Any] | str | None) -> list:
    """``model-index`` entries: one per finite numeric result of this model (the dense model's are not), with the
    dataset the protocol names."""
    from huggingface_hub import EvalResult

    spec = {k: v for k, v in protocol.items() if k != TRAINING_DATA} if isinstance(protocol, Mapping) else {}
    dataset = str(spec.get("dataset") or "custom")
    name = str(
        spec.get("dataset_name") or spec.get("dataset") or (protocol if isinstance(protocol, str) else "held-out text")
    )
    args = {k: v for k, v in spec.items() if k not in _PROTOCOL_FIELDS and isinstance(v, (str, int, float))}
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=name,
            dataset_config=spec.get("dataset_config"),
            dataset_split=spec.get("split"),
            dataset_revision=spec.get("revision"),
            dataset_args=args or None,
            metric_type=metric.lower().replace(" ", "_"),
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in results.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and not metric.startswith(DENSE_PREFIX)
    ]


def _card_body(
    config: ElsaSparsityConfig,
    report: SparsityReport | None,
    title: str,
    results: Mapping[str, Any],
    protocol: Mapping[str, Any] | str | None,
) -> str:
    achieved = config.achieved_sparsity
    head = f"{100 * achieved:.1f}% sparse" if achieved is not None else "sparse"
    lines = [f"# {title} ({head})", ""]
    base = f" from [{config.base_model}](https://huggingface.co/{config.base_model})" if config.base_model else ""
    lines += [
        (
            f"Pruned{base} with hf_elsa, the Hugging Face implementation of [ELSA]({PAPER}) (method: "
            f"`{config.method or 'unknown'}`, pattern: `{config.sparsity_type or 'unstructured'}`, target sparsity: "
            f"{_pct(config.sparsity)}). Checkpoint format: **{config.format}**."
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
        lines += _sparsity_section(report)
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
    training_data = protocol.get(TRAINING_DATA) if isinstance(protocol, Mapping) else None
    if training_data:
        lines += ["", "## Training data", "", str(training_data)]
    lines += ["", "## Evaluation", ""]
    if isinstance(protocol, Mapping):
        described = {k: v for k, v in protocol.items() if k != TRAINING_DATA}
        lines += ["Protocol:", ""] + _kv_table(described) + [""]
    elif protocol:
        lines += [f"Protocol: {protocol}", ""]
    lines += _results_table(results) if results else ["Not evaluated yet."]
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name}: {_version_of(name)}" for name in FRAMEWORKS]
    lines += ["", "## Citation", "", "ELSA, the method behind hf_elsa:", "", "```bibtex", CITATION, "```"]
    lines += [
        "",
        f"_Written by hf_elsa {config.hf_elsa_version or __version__} (elsa format {config.elsa_format_version})._",
    ]
    return "\n".join(lines)


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """``metric | value``; with the dense model's results (``dense_<metric>``) a ``dense | pruned`` table instead."""
    dense = {k.removeprefix(DENSE_PREFIX): v for k, v in results.items() if k.startswith(DENSE_PREFIX)}
    own = {k: v for k, v in results.items() if not k.startswith(DENSE_PREFIX)}
    if not dense:
        return _kv_table(own, ("metric", "value"))
    rows = ["The dense model was scored on the same windows before pruning.", "",
            "| metric | dense | pruned |", "|---|---|---|"]  # fmt: skip
    rows += [f"| {k} | {dense.get(k, '')} | {v} |" for k, v in own.items() if v is not None]
    return rows


def _version_of(package: str) -> str:
    if package == "hf_elsa":
        return __version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _sparsity_section(report: SparsityReport) -> list[str]:
    """One line when every pruned tensor has the same sparsity (a uniform run: 30 equal bars say nothing), else
    the per-layer chart and the per-type table; the per-tensor table always, collapsed."""
    shares = [t.sparsity for t in report.tensors]
    layers = {next((p for p in t.name.split(".") if p.isdigit()), None) for t in report.tensors} - {None}
    if max(shares) - min(shares) < UNIFORM_TOLERANCE:
        where = f" in {len(layers)} layers" if layers else ""
        lines = [
            (
                f"Uniform: each of the {len(report.tensors)} pruned tensors{where} is {_pct(report.sparsity)} sparse "
                f"({report.numel:,} weights); the whole model is {_pct(report.overall_sparsity)} sparse "
                f"({report.total_params:,} parameters, embeddings and norms dense)."
            ),
        ]
    else:
        lines = _layer_chart(report) + _group_table(report)
    rows = "\n".join(f"| `{t.name}` | {'x'.join(map(str, t.shape))} | {_pct(t.sparsity)} |" for t in report.tensors)
    return [*lines, "", "<details><summary>Per tensor</summary>", "", "| tensor | shape | sparsity |", "|---|---|---|",
            rows, "", "</details>", ""]  # fmt: skip


def recorded_base_model(name_or_path: str | None) -> str | None:
    """The Hub id of the dense model behind ``name_or_path``: the id itself, or what a local folder records (the
    ``base_model`` of its README.md metadata or of its elsa_config.json); None when nothing says."""
    if not name_or_path:
        return None
    folder = Path(os.path.expanduser(str(name_or_path)))
    if not folder.is_dir():
        looks_like_id = str(name_or_path).count("/") <= 1 and not str(name_or_path).startswith((".", "/", "~"))
        return str(name_or_path) if looks_like_id else None
    for read in (_card_base_model, _elsa_config_base_model):
        try:
            found = read(folder)
        except (OSError, ValueError):  # an unreadable record says nothing; the card is written anyway
            found = None
        if isinstance(found, str) and found:
            return found
    return None


def _card_base_model(folder: Path) -> Any:
    from huggingface_hub import ModelCard

    path = folder / CARD_NAME
    base = ModelCard.load(path).data.to_dict().get("base_model") if path.is_file() else None
    return base[0] if isinstance(base, list) and base else base


def _elsa_config_base_model(folder: Path) -> Any:
    path = folder / ELSA_CONFIG_NAME
    return json.loads(path.read_text(encoding="utf-8")).get("base_model") if path.is_file() else None


def fill_base_model(model: nn.Module) -> str | None:
    """Set the attached config's ``base_model`` from where the model was loaded when it is not set yet."""
    config = require_state(model).config
    if config.base_model is None:
        config.base_model = recorded_base_model(getattr(model, "name_or_path", None))
    return config.base_model


def _layer_chart(report: SparsityReport) -> list[str]:
    """Sparsity of each decoder layer (its pruned tensors together) as a text bar, when names carry a layer index."""
    layers: dict[int, list[int]] = {}
    for t in report.tensors:
        index = next((int(p) for p in t.name.split(".") if p.isdigit()), None)
        if index is not None:
            totals = layers.setdefault(index, [0, 0])
            totals[0], totals[1] = totals[0] + t.zeros, totals[1] + t.numel
    if not layers:
        return []
    lines = ["Per decoder layer:", "", "```text", "layer  sparsity"]
    for index in sorted(layers):
        zeros, numel = layers[index]
        share = zeros / max(numel, 1)
        filled = round(share * _BAR)
        lines.append(f"{index:>5}  {'#' * filled}{'.' * (_BAR - filled)}  {100 * share:6.2f}%")
    return [*lines, "```", ""]


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

    ``card_kwargs``: ``tags``, ``model_name``, ``license``, ``language``, ``datasets``, ``eval_results``,
    ``eval_protocol`` (see :func:`build_model_card`) and ``base_model``.
    """
    state = require_state(model)
    config = state.config
    if card_kwargs.get("base_model"):
        config.base_model = card_kwargs["base_model"]
    card_kwargs.pop("base_model", None)
    fill_base_model(model)
    measure(state, model.state_dict(), "model card")  # the weights may have changed since the last save
    path = Path(folder) / CARD_NAME
    text = merge_card(path, str(build_model_card(config, report_from_config(config, model), **card_kwargs)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

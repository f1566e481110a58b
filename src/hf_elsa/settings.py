"""``ElsaSettings``: the one table of ELSA's settings.

Every ELSA field is declared once here, with its default, its help text, its topic and the values it
accepts. ``ElsaConfig`` (the ``TrainingArguments`` users build) inherits these fields, ``ElsaOptimizer``
reads them under the same names, the saved metadata lists them, and ``ElsaConfig``'s docstring and
``--help`` are generated from them. Validation runs once, at construction, for every field from its
declared type and range (so NaN, infinities and wrong types are refused everywhere alike), followed by
the checks that relate several fields.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ._messages import shorten
from .admm import LAMBDA_SCHEDULES, PENALTIES, SPARSITY_SCHEDULES
from .allocation import ALLOCATIONS
from .curvature import ESTIMATORS
from .oneshot import PRUNERS
from .patterns import SparsityPattern, sparsity_pattern
from .recipes import RECIPES, BySparsity  # noqa: F401  (the recipe table, re-exported where it was)
from .registry import LiveChoices
from .states import STORAGE_DTYPES

# The registries' names as they are when a value is checked or --help printed, so entries registered after this
# module is imported (register_estimator(Mine()), then ElsaConfig(importance="mine")) are accepted and listed.
ADMM_INITS = LiveChoices(PRUNERS)
BASE_OPTIMIZERS = ("trainer", "sassha")

# Topics, in the order the docstring and --help present them.
TOPICS = {
    "sparsity": "What is pruned",
    "recipe": "Recipe and ADMM schedule",
    "curvature": "Projection score (curvature)",
    "flatness": "Flat minima (SAFE, Sassha)",
    "distillation": "Distillation from the dense model",
    "start": "Start and end of the run",
    "storage": "Memory (ELSA-L)",
}


# ELSA-L: z in FP8, u in bf16 (the 8-bit base optimizer is a TrainingArguments matter: ElsaConfig).
ELSA_L_STORAGE = {"admm_z_dtype": "float8_e4m3fn", "admm_u_dtype": "bfloat16"}


# What the table says of each field beyond its ``help`` and ``choices`` (HfArgumentParser passes a field's
# metadata to argparse, so only argparse's keywords may live there): keyed by the Field object, then by name.
_DETAILS: dict[int, dict[str, Any]] = {}


def _setting(default, topic: str, help: str, doc: str | None = None, choices=None, bounds=None, example=None, why=None):
    """A field of the table. ``bounds``: ``(low, high, low_inclusive, high_inclusive)``, ``None`` = unbounded;
    ``why``: the reason for bounds that are not obvious, added to the refusal."""
    metadata = {"help": help}
    if choices is not None:  # a LiveChoices stays live: HfArgumentParser hands the metadata to argparse as is
        metadata["choices"] = choices if isinstance(choices, LiveChoices) else tuple(choices)
    made = field(default=default, metadata=metadata)
    _DETAILS[id(made)] = {"topic": topic, "doc": doc or help, "bounds": bounds, "example": example, "why": why}
    return made


@dataclass
class ElsaSettings:
    """The ELSA settings (see ``ElsaConfig`` for the documentation of each field)."""

    # -- what is pruned ---------------------------------------------------------------------------------
    sparsity: float = _setting(
        0.7,
        "sparsity",
        "Fraction of zeros per prunable weight, 0 <= s < 1.",
        "Fraction of zeros in every prunable weight at the end, `0 <= sparsity < 1` (the mean over all prunable "
        "weights with a non-uniform `sparsity_allocation`). Ignored for N:M patterns (which give `1 - N/M`) and with "
        "`keep_mask=True` (which keeps the existing zeros).",
        bounds=(0.0, 1.0, True, False),
        example=0.7,
    )
    sparsity_type: str = _setting(
        "unstructured",
        "sparsity",
        "'unstructured' (per tensor), 'row' (per output row) or N:M such as '2:4' or '4:8'.",
        '`"unstructured"` (exactly `round(numel * sparsity)` zeros per tensor), `"row"` (the same per output '
        'row) or an N:M pattern such as `"2:4"` / `"4:8"` (N kept in every M consecutive inputs, 1 <= N < M).',
    )
    sparsity_allocation: str = _setting(
        "uniform",
        "sparsity",
        "How the sparsity is spread over tensors: one of %(choices)s.",
        'How the sparsity is spread over the prunable tensors: `"uniform"` (every tensor at `sparsity`), '
        '`"global"` (one budget of exactly `round(N * sparsity)` zeros over all N prunable weights, scores '
        'normalised per tensor so that a tensor\'s scale alone does not decide) or `"owl"` (per decoder layer, '
        "less sparsity where the layer has more outlier activations; the weighted mean stays `sparsity`; needs "
        '`importance="activation"`). Every tensor stays within `[allocation_min_sparsity, '
        "allocation_max_sparsity]`. Not for N:M patterns.",
        choices=LiveChoices(ALLOCATIONS),
    )
    allocation_min_sparsity: float = _setting(
        0.0,
        "sparsity",
        "Lowest sparsity any tensor gets under a non-uniform allocation.",
        "Lowest sparsity any single tensor gets under a non-uniform `sparsity_allocation`.",
        bounds=(0.0, 1.0, True, False),
        example=0.5,
    )
    allocation_max_sparsity: float | None = _setting(
        None,
        "sparsity",
        "Highest sparsity any tensor gets under a non-uniform allocation (default: keeps a third of the mean density).",
        "Highest sparsity any single tensor gets under a non-uniform `sparsity_allocation`, so that no layer is "
        "emptied. Default `1 - (1 - sparsity) / 3`: every tensor keeps at least a third of the mean density.",
        bounds=(0.0, 1.0, True, False),
        example=0.95,
    )
    owl_spread: float = _setting(
        0.08,
        "sparsity",
        "OWL: per-layer sparsities span sparsity +- this.",
        '`sparsity_allocation="owl"`: the per-layer sparsities span `sparsity - owl_spread` (the layer with the '
        "most outliers) to `sparsity + owl_spread` (the fewest).",
        bounds=(0.0, 1.0, True, False),
        example=0.08,
    )
    owl_outlier_threshold: float = _setting(
        5.0,
        "sparsity",
        "OWL: a weight is an outlier when its Wanda score exceeds this multiple of its layer's mean.",
        '`sparsity_allocation="owl"`: a weight is an outlier when its score `|W_ij| * ||X_j||` exceeds this '
        "multiple of its layer's mean score.",
        bounds=(0.0, None, False, False),
        example=5.0,
    )
    target_modules: list[str] | None = _setting(
        None,
        "sparsity",
        "Module name suffixes (or one regex) to prune. Default: every Linear but the LM head.",
        'Modules whose weight is pruned: names matched as a suffix of the module name (`"q_proj"`), or one regular '
        "expression matched against the full name. `None`: every `nn.Linear` (and GPT-2 `Conv1D`) except the output "
        "embedding (LM head).",
    )
    exclude_modules: list[str] | None = _setting(
        None, "sparsity", "Module name suffixes (or one regex) never to prune.", "Modules never pruned, as above."
    )

    # -- recipe and ADMM schedule ----------------------------------------------------------------------
    recipe: str = _setting(
        "elsa",
        "recipe",
        "Defaults for unset admm_* fields and importance: 'elsa' (converges in short runs), 'paper' or 'oneshot_kd'.",
        'Defaults of the fields left unset that the recipe table above lists. `"paper"`: the published recipe '
        "(penalty through the gradient, constant lambda 0.01, interval 32, ADMM for the whole run, magnitude "
        'projection, learning rate 1e-4, no distillation). `"elsa"`: starts from SparseGPT\'s weights and mask, '
        "distils from the dense model, a decoupled proximal penalty (lambda 1), a cubic sparsity ramp for z, the "
        "activation-aware projection (SAFE+); from 80% sparsity up (unstructured, row) the start is 10 points denser "
        "and z's ramp prunes the rest under distillation, the mask fixed after 30% of the steps (15% when the start "
        "is at the target: below 80% and for N:M), then masked fine-tuning; the "
        "distillation weight and learning rate follow the sparsity (docs/quality.md, docs/convergence.md). "
        '`"oneshot_kd"`: `"elsa"` without the mask search (`admm_fraction=0`): SparseGPT\'s mask is kept and the '
        "run fine-tunes with distillation.",
        choices=RECIPES,
    )
    admm_penalty: str | None = _setting(
        None,
        "recipe",
        f"How the penalty acts: one of {PENALTIES}. Default from recipe.",
        '`"gradient"` adds `lambda * (W - z + u)` to the gradient after clipping (so Adam normalises it); '
        '`"proximal"` pulls the weights after the base step: `W <- W - lambda/(1+lambda) * (W - z + u)`.',
        choices=PENALTIES,
    )
    admm_lambda: float | None = _setting(
        None,
        "recipe",
        "Final ADMM penalty weight lambda, >= 0. Default from recipe.",
        'Final penalty weight of the schedule (the constant value for `"constant"`).',
        bounds=(0.0, None, True, False),
        example=0.01,
    )
    admm_lambda_schedule: str | None = _setting(
        None,
        "recipe",
        f"Lambda schedule: one of {LAMBDA_SCHEDULES}. Default from recipe.",
        '`"constant"`, `"linear"`, `"cosine"` or `"exponential"`, from `admm_lambda_init` to `admm_lambda` '
        "over the ADMM phase. Lambda changes at z-updates; the scaled dual is rescaled when it does.",
        choices=LAMBDA_SCHEDULES,
    )
    admm_lambda_init: float | None = _setting(
        None,
        "recipe",
        "Start value of the lambda schedule, >= 0. Default from recipe.",
        'Start value of the lambda schedule (must be > 0 for `"exponential"`).',
        bounds=(0.0, None, True, False),
        example=0.0,
    )
    admm_interval: int | None = _setting(
        None,
        "recipe",
        "Optimizer steps between z/u updates (0 = automatic). Default from recipe.",
        "Optimizer steps between z/u updates (the first one follows the first step). `0`: automatic, an eighth of "
        "the ADMM phase, between 1 and 32.",
        bounds=(0, None, True, False),
        example=32,
    )
    admm_fraction: float | None = _setting(
        None,
        "recipe",
        "Fraction of steps run as ADMM before the mask is fixed, in [0, 1]. Default from recipe.",
        "Fraction of the steps run as ADMM; the weights are then hard-projected once and the rest of the run "
        "fine-tunes with that mask fixed. `1.0`: ADMM to the end (paper); `0.0`: prune at the start and fine-tune "
        "with the mask (one-shot pruning + masked fine-tuning).",
        bounds=(0.0, 1.0, True, True),
        example=0.15,
    )
    sparsity_schedule: str | None = _setting(
        None,
        "recipe",
        f"Sparsity target of z: one of {SPARSITY_SCHEDULES}. Default from recipe.",
        'Sparsity target of z: `"constant"` (the final sparsity from the start, paper) or `"cubic"` (ramps over '
        "the ADMM phase, from 0, or from `admm_init_sparsity` when the start is denser than the target). N:M patterns "
        "ramp only from a denser start, through masks that contain an N:M mask.",
        choices=SPARSITY_SCHEDULES,
    )

    # -- projection score --------------------------------------------------------------------------------
    importance: str | None = _setting(
        None,
        "curvature",
        "Projection score: one of %(choices)s. Default from recipe.",
        'Score of the projection: `"magnitude"` (`|v|`), or `(h + delta)^alpha * v^2` with a Hessian-diagonal '
        "estimate `h`: `\"adam\"` (Adam's `exp_avg_sq`, the paper's objective-aware projection; it also absorbs the "
        'penalty), `"fisher"` (EMA of the squared task gradient before the penalty is added), `"hutchinson"` '
        '(EMA of `|z * Hz|` by double backward every `hessian_interval` steps; with `base_optimizer="sassha"` '
        "Sassha's own estimate) or `\"activation\"` (`mean(x_j^2)`, SAFE+'s generalized projection with Wanda's "
        "metric, from forward hooks on the training batches). Costs and limits: docs/curvature.md.",
        choices=LiveChoices(ESTIMATORS),
    )
    importance_alpha: float = _setting(
        1.0,
        "curvature",
        "Curvature exponent alpha in (h + delta)^alpha * v^2, >= 0.",
        "Exponent of the curvature in the score `(h + delta)^alpha * v^2` (0 = magnitude, 1 = OBD).",
        bounds=(0.0, None, True, False),
        example=1.0,
    )
    importance_delta: float = _setting(
        1e-12,
        "curvature",
        "Curvature floor delta in (h + delta)^alpha * v^2, >= 0.",
        "Floor `delta` added to the curvature in the score, so entries with zero curvature still rank by `|v|`.",
        bounds=(0.0, None, True, False),
        example=1e-12,
    )
    importance_beta: float = _setting(
        0.99,
        "curvature",
        "EMA decay of the fisher and hutchinson estimates, in [0, 1).",
        'EMA decay of the `"fisher"` (updated every step) and `"hutchinson"` (every refresh) estimates; both are '
        "bias-corrected by their number of updates.",
        bounds=(0.0, 1.0, True, False),
        example=0.99,
    )
    hessian_interval: int = _setting(
        10,
        "curvature",
        "Optimizer steps between Hutchinson refreshes (hutchinson, sassha), >= 1.",
        'Optimizer steps between Hutchinson refreshes (`importance="hutchinson"`, and Sassha\'s Hessian); the first '
        "step refreshes.",
        bounds=(1, None, True, False),
        example=10,
    )

    # -- flat minima -----------------------------------------------------------------------------------
    sam_rho: float = _setting(
        0.0,
        "flatness",
        "SAFE: SAM radius of the x-step gradient (0 = off); Sassha's rho.",
        "SAFE: radius of the SAM perturbation. `> 0` takes the x-step gradient at `x + rho * g / ||g||` (a second "
        "forward/backward of the same micro-batches; the ADMM penalty is added after). With "
        '`base_optimizer="sassha"` it is Sassha\'s `rho`. `0`: plain gradient.',
        bounds=(0.0, None, True, False),
        example=2e-4,
    )
    base_optimizer: str = _setting(
        "trainer",
        "flatness",
        f"Optimizer of the x-step: one of {BASE_OPTIMIZERS} ('trainer' = what optim builds).",
        'Optimizer of the x-step: `"trainer"` (whatever `optim` builds, AdamW by default) or `"sassha"` '
        "([`hf_elsa.Sassha`] with `learning_rate`, `(adam_beta1, adam_beta2)`, `adam_epsilon`, `weight_decay`, "
        "`sam_rho` and `hessian_interval`; the paper uses `adam_beta2=0.999`, `adam_epsilon=1e-4`).",
        choices=BASE_OPTIMIZERS,
    )

    # -- distillation --------------------------------------------------------------------------------
    distill_weight: float | None = _setting(
        None,
        "distillation",
        "Weight w of the distillation loss: (1 - w) * next-token loss + w * T^2 * KL(teacher || student). "
        "Default from recipe.",
        "Weight `w` in `[0, 1]` of distillation from the dense model: the training loss becomes `(1 - w) * "
        "next-token loss + w * T^2 * KL(teacher || student)` over the full vocabulary at temperature "
        "`distill_temperature`, computed in chunks of tokens. The teacher is `ElsaTrainer(teacher_model=...)`, by "
        "default a frozen copy of the model as it enters `train()`. One teacher forward per micro-batch "
        "(docs/distillation.md).",
        bounds=(0.0, 1.0, True, True),
        example=1.0,
    )
    distill_temperature: float = _setting(
        1.0,
        "distillation",
        "Temperature T of the distillation KL, 0.1 <= T <= 100.",
        "Temperature `0.1 <= T <= 100` of both distributions in the distillation KL (the loss is multiplied by `T^2`).",
        bounds=(0.1, 100.0, True, True),
        example=1.0,
        why="below 0.1 both softmaxes are one-hot in float32 and the T^2-scaled KL vanishes (the run would train on a "
        "zero distillation loss); above 100 both are uniform and it carries no signal",
    )
    distill_hidden_weight: float = _setting(
        0.0,
        "distillation",
        "Weight of the per-layer hidden-state loss to the teacher (SquareHead), >= 0.",
        "Weight of an added per-layer hidden-state loss to the teacher (SquareHead): the mean over layers of "
        "`||h_student - h_teacher||^2 / ||h_teacher||^2` per token, averaged over tokens like the next-token loss.",
        bounds=(0.0, None, True, False),
        example=1.0,
    )

    # -- start and end -----------------------------------------------------------------------------------
    admm_init: str | None = _setting(
        None,
        "start",
        "Initial z (or fixed mask): one of %(choices)s. Default from recipe.",
        'How the initial z is chosen: `"magnitude"` (paper), `"wanda"` or `"sparsegpt"` (one-shot pruners run '
        "on `admm_init_samples` training blocks; z starts from the pruner's weights, and a ramped z grows sparse in "
        "the order of the pruner's ranking). With `admm_fraction=0` it chooses the fixed mask (and, for SparseGPT, "
        "the updated weights): one-shot pruning followed by masked fine-tuning.",
        choices=ADMM_INITS,
    )
    admm_init_samples: int = _setting(
        128,
        "start",
        "Training blocks used as calibration data by admm_init, >= 1.",
        "Number of training blocks used as calibration data by `admm_init`.",
        bounds=(1, None, True, False),
        example=128,
    )
    admm_init_sparsity: float | None = _setting(
        None,
        "start",
        "Sparsity of the one-shot start when it is denser than the target (z's ramp goes from it to sparsity). "
        "Default from recipe.",
        "Sparsity the run starts from when it should start denser than `sparsity`: the one-shot pruner of "
        "`admm_init` prunes to it (unstructured under an N:M target), z's cubic ramp (`sparsity_schedule`) goes from "
        "it to `sparsity` during the ADMM phase, so the last part of the mask is chosen under the training loss "
        "(distillation included) rather than by the one-shot pruner. `None` (or `sparsity` itself): the start is at "
        "`sparsity` and the ramp starts from 0. Needs an ADMM phase (`admm_fraction > 0`) and `admm_init_sparsity <= sparsity`. Recipe "
        '`"elsa"`: `sparsity - 0.1` from 80% sparsity up for unstructured and row patterns (with `admm_fraction` '
        "0.3), `None` below 80%, for N:M and with `admm_fraction=0` (docs/quality.md).",
        bounds=(0.0, 1.0, True, False),
        example=0.5,
    )
    final_projection: bool = _setting(
        True,
        "start",
        "Hard-project the weights when ADMM ends so the model is exactly sparse.",
        "Hard-project the weights themselves when the ADMM phase ends, so the model is exactly sparse.",
    )
    keep_mask: bool = _setting(
        False,
        "start",
        "Fine-tune an already sparse model keeping its zeros (no ADMM).",
        "Fine-tune an already sparse model keeping its zeros exactly (no ADMM; `sparsity` is not used).",
    )

    # -- memory ------------------------------------------------------------------------------------------
    admm_z_dtype: str | None = _setting(
        None,
        "storage",
        f"Storage dtype of z: one of {tuple(STORAGE_DTYPES)}. Default float32 (ELSA-L: FP8).",
        'Storage dtype of z: `"float32"` (default), `"bfloat16"`, `"float8_e4m3fn"` or `"float8_e5m2"`. FP8 '
        "keeps one fp32 scale per tensor (`max|z| / fp8_max * 1.05`); z is dequantized on every read and requantized "
        "on every write, and its support (`z != 0`) is kept exactly (docs/memory.md).",
        choices=STORAGE_DTYPES,
    )
    admm_u_dtype: str | None = _setting(
        None,
        "storage",
        f"Storage dtype of u: one of {tuple(STORAGE_DTYPES)}. Default float32 (ELSA-L: bf16).",
        'Storage dtype of the scaled dual u, same choices as `admm_z_dtype` (default `"float32"`).',
        choices=STORAGE_DTYPES,
    )
    elsa_l: bool = _setting(
        False,
        "storage",
        "ELSA-L preset: z float8_e4m3fn, u bfloat16, optim adamw_bnb_8bit (needs bitsandbytes).",
        "ELSA-L, the paper's memory-lean variant: z in `float8_e4m3fn`, u in `bfloat16` and bitsandbytes' 8-bit "
        'AdamW (`optim="adamw_bnb_8bit"`, needs `pip install "hf_elsa[elsa-l]"`). Fields set explicitly win; a '
        "`float32` z or u, or a base optimizer that is not 8-bit, contradicts it and raises. About 3 bytes of ADMM "
        "state per prunable weight instead of 8 (see `hf_elsa.estimate_memory`).",
    )

    def __post_init__(self):
        self.resolve_elsa_settings()

    # -- resolution and validation, once -------------------------------------------------------------------
    def resolve_elsa_settings(self) -> None:
        """Fill recipe defaults, validate every field against the table, then the relations between fields."""
        owner = type(self).__name__
        recipe = self.recipe
        if recipe not in RECIPES:
            raise ValueError(f"{owner}.recipe={shorten(recipe)}: use one of {tuple(RECIPES)}.")
        derived = {}  # defaults filled from other fields: validate() re-derives them when those fields change
        for key, value in RECIPES[recipe].items():
            if hasattr(self, key) and getattr(self, key) is None and not callable(value):
                setattr(self, key, value)
                derived[key] = value
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("admm_z_dtype", "admm_u_dtype"):
            if self.elsa_l and getattr(self, name) == "float32":
                raise ValueError(
                    f"{owner}.elsa_l=True stores z and u in low precision, but {name}='float32' was set: drop {name} "
                    f"(ELSA-L uses {ELSA_L_STORAGE[name]!r}), pick another of {tuple(STORAGE_DTYPES)[1:]}, or set "
                    "elsa_l=False."
                )
            if getattr(self, name) is None:
                setattr(self, name, ELSA_L_STORAGE[name] if self.elsa_l else "float32")
                derived[name] = getattr(self, name)
        for f in elsa_fields():
            _check_field(owner, f, getattr(self, f.name))
        try:
            self._pattern = sparsity_pattern(self.sparsity_type)
        except ValueError as error:
            raise ValueError(f"{owner}.{error}") from None
        for key, value in RECIPES[recipe].items():  # defaults that depend on other settings (learning_rate)
            if hasattr(self, key) and getattr(self, key) is None and callable(value):
                setattr(self, key, value(self))
                derived[key] = getattr(self, key)
        if self.allocation_max_sparsity is None:
            self.allocation_max_sparsity = 1.0 - (1.0 - self.sparsity) / 3.0
            derived["allocation_max_sparsity"] = self.allocation_max_sparsity
        self._elsa_derived = derived
        self._check_relations(owner)

    def validate(self) -> None:
        """Check the ELSA fields again, as construction does.

        transformers' habit (``GenerationConfig.validate``, called when the config is built and again by
        ``generate``): a config is checked when it is built and again when it is used; ``ElsaTrainer`` calls this
        at its start. So a field changed after construction (``args.sparsity = 0.9``, ``args.admm_lambda = nan``)
        is checked before any training, naming the field, and the defaults derived from other fields
        (``allocation_max_sparsity``, the recipe's values such as ``learning_rate``, the z/u storage dtypes)
        follow the change -- unless they were set explicitly (after construction too).
        """
        for name, value in getattr(self, "_elsa_derived", {}).items():
            if getattr(self, name, None) == value:  # still the derived value: derive it again
                setattr(self, name, None)
        self.resolve_elsa_settings()

    @property
    def distills(self) -> bool:
        """Whether the run learns from a teacher (distillation weight or hidden-state weight above 0)."""
        return self.distill_weight > 0 or self.distill_hidden_weight > 0

    def _check_relations(self, owner: str) -> None:
        if self.allocation_min_sparsity > self.allocation_max_sparsity:
            raise ValueError(
                f"{owner}.allocation_min_sparsity={self.allocation_min_sparsity} is above allocation_max_sparsity="
                f"{self.allocation_max_sparsity}: no tensor could satisfy both; lower the floor or raise the cap."
            )
        derived = getattr(self, "_elsa_derived", {})
        bounds_set = self.allocation_min_sparsity != 0.0 or "allocation_max_sparsity" not in derived
        if self.sparsity_allocation == "uniform" and bounds_set:
            warnings.warn(
                f"{owner}: allocation_min_sparsity={self.allocation_min_sparsity} / allocation_max_sparsity="
                f"{self.allocation_max_sparsity} are ignored: sparsity_allocation='uniform' gives every tensor "
                f"sparsity={self.sparsity}. Use sparsity_allocation='global' or 'owl' for per-tensor bounds.",
                UserWarning,
                stacklevel=4,
            )
        if self.admm_lambda_schedule == "exponential" and (self.admm_lambda_init <= 0 or self.admm_lambda <= 0):
            raise ValueError(
                f"{owner}.admm_lambda_schedule='exponential' needs admm_lambda_init > 0 and admm_lambda > 0 "
                f"(got {self.admm_lambda_init} and {self.admm_lambda}); use 'linear' or 'cosine' to start from 0."
            )
        if self.sparsity_allocation != "uniform":
            if not self._pattern.allows_allocation:
                raise ValueError(
                    f"{owner}.sparsity_allocation={self.sparsity_allocation!r} varies the sparsity per tensor, which "
                    f"sparsity_type={self.sparsity_type!r} fixes: use sparsity_allocation='uniform' with N:M."
                )
            if not self.allocation_min_sparsity <= self.sparsity <= self.allocation_max_sparsity:
                raise ValueError(
                    f"{owner}.allocation_min_sparsity={self.allocation_min_sparsity} and allocation_max_sparsity="
                    f"{self.allocation_max_sparsity} must enclose sparsity={self.sparsity}."
                )
            ALLOCATIONS.get(self.sparsity_allocation).check_settings(self, owner)
        if self.admm_init_sparsity is not None and not self.keep_mask:
            if self.admm_fraction == 0:
                raise ValueError(
                    f"{owner}.admm_init_sparsity={self.admm_init_sparsity} starts denser than the target and lets "
                    "ADMM prune the rest, but admm_fraction=0 has no ADMM phase: set admm_fraction > 0 (e.g. 0.3) or "
                    "drop admm_init_sparsity."
                )
            if self.admm_init_sparsity > self.final_sparsity:
                raise ValueError(
                    f"{owner}.admm_init_sparsity={self.admm_init_sparsity} is above the target sparsity "
                    f"{self.final_sparsity}: the start must be denser than (or as sparse as) the end."
                )
        if self.base_optimizer == "sassha" and self.importance == "adam":
            raise ValueError(
                f"{owner}.importance='adam' reads Adam's exp_avg_sq, which base_optimizer='sassha' does not keep: "
                "use importance='hutchinson' (Sassha's own Hessian estimate) or another importance."
            )

    @property
    def pattern(self) -> SparsityPattern:
        """The parsed ``sparsity_type`` (parsed once; re-parsed only if the field was reassigned)."""
        pattern = getattr(self, "_pattern", None)
        if pattern is None or pattern.name != self.sparsity_type:
            self._pattern = pattern = sparsity_pattern(self.sparsity_type)
        return pattern

    @property
    def final_sparsity(self) -> float:
        """The mean sparsity the prunable weights end with (``1 - N/M`` for N:M patterns)."""
        return self.pattern.sparsity(self.sparsity)

    def elsa_settings(self) -> ElsaSettings:
        """A plain ``ElsaSettings`` with this object's ELSA fields (for ``ElsaConfig``: without the Trainer's)."""
        settings = ElsaSettings.__new__(ElsaSettings)
        for f in elsa_fields():
            value = getattr(self, f.name)
            setattr(settings, f.name, list(value) if isinstance(value, list) else value)
        settings._pattern = self.pattern
        return settings

    def elsa_dict(self) -> dict[str, Any]:
        """``{field: value}`` of every ELSA field (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in elsa_fields()}


def elsa_fields() -> tuple:
    """The ELSA fields, in table order."""
    return fields(ElsaSettings)


DETAILS: dict[str, dict[str, Any]] = {f.name: _DETAILS[id(f)] for f in elsa_fields()}


def _check_field(owner: str, f, value) -> None:
    """Check one value against its table entry: type, finiteness, bounds, choices."""
    meta = {**DETAILS[f.name], **f.metadata}
    where = f"{owner}.{f.name}={shorten(value)}"
    if value is None:
        if f.default is None:
            return
        raise ValueError(f"{where}: a value is required.")
    # f.type is the annotation string, or the type itself once an HfArgumentParser has resolved it in place
    if f.type in ("bool", bool) and not isinstance(value, bool):
        raise ValueError(f"{where} must be True or False.")
    if meta["bounds"] is not None:
        low, high, low_inclusive, high_inclusive = meta["bounds"]
        integer = "int" in str(f.type)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{where} must be {kind} (e.g. {meta.get('example')}).")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number (e.g. {meta.get('example')}).")
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
            why = f": {meta['why']}" if meta.get("why") else ""
            raise ValueError(f"{where} must be in {interval} (e.g. {meta.get('example')}){why}.")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{where}: use one of {tuple(meta['choices'])}.")
    if f.name in ("target_modules", "exclude_modules") and (
        not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value)
    ):
        raise ValueError(f"{where} must be a list of module names (e.g. ['q_proj', 'v_proj']).")


def settings_docstring() -> str:
    """The ``Parameters`` section of ``ElsaConfig``'s docstring, grouped by topic, generated from the table."""
    lines = []
    for topic, title in TOPICS.items():
        lines.append(f"    > {title}\n")
        for f in elsa_fields():
            if DETAILS[f.name]["topic"] != topic:
                continue
            default = f.default if f.default is not MISSING else None
            default_text = "set by `recipe`" if f.name in RECIPES["elsa"] else f"defaults to `{default!r}`"
            lines.append(f"        {f.name} (`{f.type}`, {default_text}):")
            lines.extend(
                textwrap.wrap(DETAILS[f.name]["doc"], 108, initial_indent=" " * 12, subsequent_indent=" " * 12)
            )
        lines.append("")
    return "\n".join(lines)


def help_text(f) -> str:
    """A field's ``help`` with ``%(choices)s`` (which argparse fills in ``--help``) filled the same way."""
    text = f.metadata["help"]
    if "choices" in f.metadata:
        text = text.replace("%(choices)s", ", ".join(map(str, f.metadata["choices"])))
    return text


def settings_markdown() -> str:
    """The fields as markdown tables, one per topic (docs/index.md holds this text; a test keeps it in sync)."""
    lines = []
    for topic, title in TOPICS.items():
        lines += [f"**{title}**", "", "| field | default | meaning |", "|---|---|---|"]
        for f in elsa_fields():
            if DETAILS[f.name]["topic"] != topic:
                continue
            default = "recipe" if f.name in RECIPES["elsa"] else f"`{f.default!r}`"
            lines.append(f"| `{f.name}` | {default} | {help_text(f).replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)

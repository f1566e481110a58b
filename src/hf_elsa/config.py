"""``ElsaConfig``: the ELSA fields on top of ``transformers.TrainingArguments``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .admm import LAMBDA_SCHEDULES, PENALTIES, SPARSITY_SCHEDULES, AdmmSettings
from .curvature import IMPORTANCES
from .projection import parse_sparsity_type
from .states import STORAGE_DTYPES

ADMM_INITS = ("magnitude", "wanda", "sparsegpt")
BASE_OPTIMIZERS = ("trainer", "sassha")

# ELSA-L (ALGORITHMS.md §5): z in FP8, u in bf16, an 8-bit Adam. bitsandbytes' 8-bit AdamW is the one
# that also runs on CPU (torchao's AdamW8bit needs torch.compile per tensor shape; docs/memory.md).
ELSA_L = {"admm_z_dtype": "float8_e4m3fn", "admm_u_dtype": "bfloat16", "optim": "adamw_bnb_8bit"}
ELSA_L_INSTALL = 'pip install "hf_elsa[elsa-l]"  (or: pip install bitsandbytes)'

# Values of the recipe-controlled fields left at None. "paper" is the ICLR 2026 recipe verbatim;
# "elsa" is this library's default, which converges within short step budgets (docs/convergence.md).
RECIPES: dict[str, dict] = {
    "paper": {
        "admm_penalty": "gradient",
        "admm_lambda": 0.01,
        "admm_lambda_schedule": "constant",
        "admm_lambda_init": 0.0,
        "admm_interval": 32,
        "admm_fraction": 1.0,
        "sparsity_schedule": "constant",
        "importance": "magnitude",
    },
    "elsa": {
        "admm_penalty": "proximal",
        "admm_lambda": 1.0,
        "admm_lambda_schedule": "constant",
        "admm_lambda_init": 0.0,
        "admm_interval": 0,
        "admm_fraction": 0.15,
        "sparsity_schedule": "cubic",
        "importance": "activation",
    },
}


_DEFAULT_OPTIM = next(f.default for f in fields(TrainingArguments) if f.name == "optim")
# the package each 8-bit optimizer of TrainingArguments.optim needs (bitsandbytes for the others)
_OPTIM_PACKAGES = {"adamw_torch_8bit": "torchao", "galore_": "galore_torch", "apollo_": "apollo_torch"}


@dataclass
class ElsaConfig(TrainingArguments):
    r"""
    Configuration for [`ElsaTrainer`]: every `TrainingArguments` field plus the ELSA fields below.

    Parameters:
        sparsity (`float`, defaults to `0.7`):
            Fraction of zeros in every prunable weight at the end, `0 <= sparsity < 1`. Ignored for N:M
            patterns (which give `1 - N/M`) and with `keep_mask=True` (which keeps the existing zeros).
        sparsity_type (`str`, defaults to `"unstructured"`):
            `"unstructured"` (exactly `round(numel * sparsity)` zeros per tensor), `"row"` (the same per
            output row) or an N:M pattern such as `"2:4"` / `"4:8"` (N kept in every M consecutive inputs).
        target_modules (`list[str]` or `None`, defaults to `None`):
            Modules whose weight is pruned: names matched as a suffix of the module name (`"q_proj"`), or
            one regular expression matched against the full name. `None`: every `nn.Linear` (and GPT-2
            `Conv1D`) except the output embedding (LM head).
        exclude_modules (`list[str]` or `None`, defaults to `None`):
            Modules never pruned, matched like `target_modules`.
        recipe (`str`, defaults to `"elsa"`):
            Defaults of the `admm_*` fields and `importance` left unset. `"paper"`: the published recipe
            (penalty through the gradient, constant lambda 0.01, interval 32, ADMM for the whole run, magnitude
            projection). `"elsa"`: a decoupled proximal penalty (lambda 1), a cubic sparsity ramp for z, the
            activation-aware projection (SAFE+), the mask fixed after 15% of the steps, then masked fine-tuning;
            it converges within short budgets (docs/convergence.md).
        admm_penalty (`str`, *optional*):
            `"gradient"` adds `lambda * (W - z + u)` to the gradient after clipping (so Adam normalises it);
            `"proximal"` pulls the weights after the base step: `W <- W - lambda/(1+lambda) * (W - z + u)`.
        admm_lambda (`float`, *optional*):
            Final penalty weight of the schedule (the constant value for `"constant"`).
        admm_lambda_schedule (`str`, *optional*):
            `"constant"`, `"linear"`, `"cosine"` or `"exponential"`, from `admm_lambda_init` to `admm_lambda`
            over the ADMM phase. Lambda changes at z-updates; the scaled dual is rescaled when it does.
        admm_lambda_init (`float`, *optional*):
            Start value of the lambda schedule (must be > 0 for `"exponential"`).
        admm_interval (`int`, *optional*):
            Optimizer steps between z/u updates (the first one follows the first step). `0`: automatic, an
            eighth of the ADMM phase, between 1 and 32.
        admm_fraction (`float`, *optional*):
            Fraction of the steps run as ADMM; the weights are then hard-projected once and the rest of the
            run fine-tunes with that mask fixed. `1.0`: ADMM to the end (paper); `0.0`: prune at the start and
            fine-tune with the mask (magnitude pruning + masked fine-tuning).
        sparsity_schedule (`str`, *optional*):
            Sparsity target of z: `"constant"` (the final sparsity from the start, paper) or `"cubic"` (ramps from
            0 to `sparsity` over the ADMM phase).
        importance (`str`, *optional*):
            Score of the projection: `"magnitude"` (`|v|`), or `(h + delta)^alpha * v^2` with a Hessian-diagonal
            estimate `h`: `"adam"` (Adam's `exp_avg_sq`, the paper's objective-aware projection; it also absorbs the
            penalty), `"fisher"` (EMA of the squared task gradient before the penalty is added), `"hutchinson"`
            (EMA of `|z * Hz|` by double backward every `hessian_interval` steps; with `base_optimizer="sassha"`
            Sassha's own estimate) or `"activation"` (`mean(x_j^2)`, SAFE+'s generalized projection with Wanda's
            metric, from forward hooks on the training batches). A mask fixed at step 0 (`admm_fraction=0`) is
            chosen by magnitude or `admm_init`. Costs and limits: docs/curvature.md.
        importance_alpha (`float`, defaults to `1.0`):
            Exponent of the curvature in the score `(h + delta)^alpha * v^2` (0 = magnitude, 1 = OBD).
        importance_delta (`float`, defaults to `1e-12`):
            Floor `delta` added to the curvature in the score, so entries with zero curvature still rank by `|v|`.
        importance_beta (`float`, defaults to `0.99`):
            EMA decay of the `"fisher"` (updated every step) and `"hutchinson"` (every refresh) estimates; both are
            bias-corrected by their number of updates.
        hessian_interval (`int`, defaults to `10`):
            Optimizer steps between Hutchinson refreshes (`importance="hutchinson"`, and Sassha's Hessian); the
            first step refreshes.
        sam_rho (`float`, defaults to `0.0`):
            SAFE: radius of the SAM perturbation. `> 0` takes the x-step gradient at `x + rho * g / ||g||` (a second
            forward/backward of the same micro-batches; the ADMM penalty is added after). With
            `base_optimizer="sassha"` it is Sassha's `rho`. `0`: plain gradient.
        base_optimizer (`str`, defaults to `"trainer"`):
            Optimizer of the x-step: `"trainer"` (whatever `optim` builds, AdamW by default) or `"sassha"`
            ([`hf_elsa.Sassha`] with `learning_rate`, `(adam_beta1, adam_beta2)`, `adam_epsilon`, `weight_decay`,
            `sam_rho` and `hessian_interval`; the paper uses `adam_beta2=0.999`, `adam_epsilon=1e-4`).
        final_projection (`bool`, defaults to `True`):
            Hard-project the weights themselves when the ADMM phase ends, so the model is exactly sparse.
        keep_mask (`bool`, defaults to `False`):
            Fine-tune an already sparse model keeping its zeros exactly (no ADMM; `sparsity` is not used).
        admm_init (`str`, defaults to `"magnitude"`):
            How the initial z is chosen: `"magnitude"` (paper), `"wanda"` or `"sparsegpt"` (one-shot pruners run
            on `admm_init_samples` training blocks). With `admm_fraction=0` it chooses the fixed mask (and, for
            SparseGPT, the updated weights): one-shot pruning followed by masked fine-tuning.
        admm_init_samples (`int`, defaults to `128`):
            Number of training blocks used as calibration data by `admm_init`.
        admm_z_dtype (`str`, *optional*):
            Storage dtype of z: `"float32"` (default), `"bfloat16"`, `"float8_e4m3fn"` or `"float8_e5m2"`. FP8 keeps one
            fp32 scale per tensor (`max|z| / fp8_max * 1.05`); z is dequantized on every read and requantized on
            every write, and its support (`z != 0`) is kept exactly (docs/memory.md).
        admm_u_dtype (`str`, *optional*):
            Storage dtype of the scaled dual u, same choices as `admm_z_dtype` (default `"float32"`).
        elsa_l (`bool`, defaults to `False`):
            ELSA-L, the paper's memory-lean variant: z in `float8_e4m3fn`, u in `bfloat16` and bitsandbytes' 8-bit
            AdamW (`optim="adamw_bnb_8bit"`, needs `pip install "hf_elsa[elsa-l]"`). Fields set explicitly win; a
            `float32` z or u, or a base optimizer that is not 8-bit, contradicts it and raises. About 3 bytes of ADMM
            state per prunable weight instead of 8 (see `hf_elsa.estimate_memory`).
    """

    sparsity: float = field(default=0.7, metadata={"help": "Fraction of zeros per prunable weight, 0 <= s < 1."})
    sparsity_type: str = field(
        default="unstructured",
        metadata={"help": "'unstructured' (per tensor), 'row' (per output row) or N:M such as '2:4' or '4:8'."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module name suffixes (or one regex) to prune. Default: every Linear but the LM head."},
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Module name suffixes (or one regex) never to prune."}
    )
    recipe: str = field(
        default="elsa",
        metadata={"help": "Defaults for unset admm_* fields: 'elsa' (converges in short runs) or 'paper'."},
    )
    admm_penalty: str | None = field(
        default=None, metadata={"help": f"How the penalty acts: one of {PENALTIES}. Default from recipe."}
    )
    admm_lambda: float | None = field(
        default=None, metadata={"help": "Final ADMM penalty weight lambda. Default from recipe."}
    )
    admm_lambda_schedule: str | None = field(
        default=None, metadata={"help": f"Lambda schedule: one of {LAMBDA_SCHEDULES}. Default from recipe."}
    )
    admm_lambda_init: float | None = field(
        default=None, metadata={"help": "Start value of the lambda schedule. Default from recipe."}
    )
    admm_interval: int | None = field(
        default=None, metadata={"help": "Optimizer steps between z/u updates. Default from recipe."}
    )
    admm_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction of steps run as ADMM before the mask is fixed, in [0, 1]. Default from recipe."},
    )
    sparsity_schedule: str | None = field(
        default=None, metadata={"help": f"Sparsity target of z: one of {SPARSITY_SCHEDULES}. Default from recipe."}
    )
    importance: str | None = field(
        default=None, metadata={"help": f"Projection score: one of {IMPORTANCES}. Default from recipe."}
    )
    importance_alpha: float = field(
        default=1.0, metadata={"help": "Curvature exponent alpha in (h + delta)^alpha * v^2."}
    )
    importance_delta: float = field(
        default=1e-12, metadata={"help": "Curvature floor delta in (h + delta)^alpha * v^2, >= 0."}
    )
    importance_beta: float = field(
        default=0.99, metadata={"help": "EMA decay of the fisher and hutchinson estimates, in [0, 1)."}
    )
    hessian_interval: int = field(
        default=10, metadata={"help": "Optimizer steps between Hutchinson refreshes (hutchinson, sassha), >= 1."}
    )
    sam_rho: float = field(
        default=0.0, metadata={"help": "SAFE: SAM radius of the x-step gradient (0 = off); Sassha's rho."}
    )
    base_optimizer: str = field(
        default="trainer",
        metadata={"help": f"Optimizer of the x-step: one of {BASE_OPTIMIZERS} ('trainer' = what optim builds)."},
    )
    final_projection: bool = field(
        default=True, metadata={"help": "Hard-project the weights when ADMM ends so the model is exactly sparse."}
    )
    keep_mask: bool = field(
        default=False, metadata={"help": "Fine-tune an already sparse model keeping its zeros (no ADMM)."}
    )

    admm_init: str = field(
        default="magnitude", metadata={"help": f"Initial z (or fixed mask): one of {ADMM_INITS}."}
    )
    admm_init_samples: int = field(
        default=128, metadata={"help": "Training blocks used as calibration data by admm_init."}
    )
    admm_z_dtype: str | None = field(
        default=None,
        metadata={"help": f"Storage dtype of z: one of {tuple(STORAGE_DTYPES)}. Default float32 (ELSA-L: FP8)."},
    )
    admm_u_dtype: str | None = field(
        default=None,
        metadata={"help": f"Storage dtype of u: one of {tuple(STORAGE_DTYPES)}. Default float32 (ELSA-L: bf16)."},
    )
    elsa_l: bool = field(
        default=False,
        metadata={"help": "ELSA-L preset: z float8_e4m3fn, u bfloat16, optim adamw_bnb_8bit (needs bitsandbytes)."},
    )

    # TrainingArguments defaults that suit pruning runs (paper: Adam betas (0.9, 0.95), lr 1e-4-2e-4).
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Beta2 for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self):
        self._validate_elsa_fields()
        super().__post_init__()
        self._validate_double_backward()

    def _validate_curvature_fields(self) -> None:
        if self.base_optimizer not in BASE_OPTIMIZERS:
            raise ValueError(f"ElsaConfig.base_optimizer={self.base_optimizer!r}: use one of {BASE_OPTIMIZERS}.")
        if not isinstance(self.importance_delta, (int, float)) or self.importance_delta < 0:
            raise ValueError(f"ElsaConfig.importance_delta={self.importance_delta!r} must be >= 0 (e.g. 1e-12).")
        if not 0.0 <= self.importance_beta < 1.0:
            raise ValueError(f"ElsaConfig.importance_beta={self.importance_beta!r} must be in [0, 1) (e.g. 0.99).")
        if (
            isinstance(self.hessian_interval, bool)
            or not isinstance(self.hessian_interval, int)
            or self.hessian_interval < 1
        ):
            raise ValueError(f"ElsaConfig.hessian_interval={self.hessian_interval!r} must be an integer >= 1.")
        if not isinstance(self.sam_rho, (int, float)) or self.sam_rho < 0:
            raise ValueError(f"ElsaConfig.sam_rho={self.sam_rho!r} must be >= 0 (0 = no SAM; SAFE uses 2e-4).")
        if self.base_optimizer == "sassha" and self.importance == "adam":
            raise ValueError(
                "ElsaConfig.importance='adam' reads Adam's exp_avg_sq, which base_optimizer='sassha' does not keep: "
                "use importance='hutchinson' (Sassha's own Hessian estimate) or another importance."
            )

    def _validate_double_backward(self) -> None:
        """Hutchinson (importance or Sassha) needs a double backward: refuse setups that cannot do one.

        Runs after ``TrainingArguments.__post_init__``, which resolves the checkpointing aliases."""
        users = []
        if self.importance == "hutchinson":
            users.append("importance='hutchinson'")
        if self.base_optimizer == "sassha":
            users.append("base_optimizer='sassha'")
        if not users:
            return
        what = " and ".join(users)
        if self.torch_compile:
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward (Hessian-vector products), which torch.compile does not "
                "support: set torch_compile=False, or use importance='fisher' with the Trainer's optimizer."
            )
        if self.fsdp:
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward, which FSDP does not run with its default resharding: "
                "hf_elsa supports it on one process or under DDP. Use importance='fisher' or 'activation' with FSDP."
            )
        checkpointing = getattr(self, "activation_checkpointing", None) or self.gradient_checkpointing
        kwargs = getattr(self, "activation_checkpointing_kwargs", None) or self.gradient_checkpointing_kwargs or {}
        if checkpointing and isinstance(kwargs, dict) and kwargs.get("use_reentrant", False):
            raise ValueError(
                f"ElsaConfig.{what} needs a double backward, which reentrant gradient checkpointing does not "
                "support: drop use_reentrant=True from activation_checkpointing_kwargs (non-reentrant is the default)."
            )

    def _validate_elsa_fields(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"ElsaConfig.sparsity={self.sparsity!r} must satisfy 0 <= sparsity < 1 (e.g. 0.7).")
        parse_sparsity_type(self.sparsity_type)
        if self.recipe not in RECIPES:
            raise ValueError(f"ElsaConfig.recipe={self.recipe!r}: use one of {tuple(RECIPES)}.")
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for name, allowed in (
            ("admm_penalty", PENALTIES),
            ("admm_lambda_schedule", LAMBDA_SCHEDULES),
            ("sparsity_schedule", SPARSITY_SCHEDULES),
            ("importance", IMPORTANCES),
            ("admm_init", ADMM_INITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ElsaConfig.{name}={getattr(self, name)!r}: use one of {allowed}.")
        if self.admm_lambda < 0 or self.admm_lambda_init < 0:
            raise ValueError("ElsaConfig.admm_lambda and admm_lambda_init must be >= 0.")
        if self.admm_lambda_schedule == "exponential" and (self.admm_lambda_init <= 0 or self.admm_lambda <= 0):
            raise ValueError(
                "ElsaConfig.admm_lambda_schedule='exponential' needs admm_lambda_init > 0 and admm_lambda > 0 "
                f"(got {self.admm_lambda_init} and {self.admm_lambda}); use 'linear' or 'cosine' to start from 0."
            )
        if not isinstance(self.admm_interval, int) or self.admm_interval < 0:
            raise ValueError(
                f"ElsaConfig.admm_interval={self.admm_interval!r} must be an integer >= 1, or 0 for automatic."
            )
        if not 0.0 <= self.admm_fraction <= 1.0:
            raise ValueError(f"ElsaConfig.admm_fraction={self.admm_fraction!r} must be in [0, 1].")
        if self.admm_init != "magnitude" and self.sparsity_schedule == "cubic" and self.admm_fraction > 0:
            raise ValueError(
                f"ElsaConfig.admm_init={self.admm_init!r} sets the initial z, but sparsity_schedule='cubic' starts z "
                "dense; use sparsity_schedule='constant', or admm_fraction=0 for one-shot pruning + masked fine-tuning."
            )
        if self.admm_init_samples < 1:
            raise ValueError(f"ElsaConfig.admm_init_samples={self.admm_init_samples} must be >= 1.")
        if self.importance_alpha < 0:
            raise ValueError(f"ElsaConfig.importance_alpha={self.importance_alpha!r} must be >= 0.")
        self._validate_curvature_fields()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        self._validate_storage()

    def _validate_storage(self) -> None:
        """Storage dtypes of z and u, and the ELSA-L preset (which also picks the 8-bit base optimizer)."""
        for name in ("admm_z_dtype", "admm_u_dtype"):
            value = getattr(self, name)
            if value is not None and value not in STORAGE_DTYPES:
                raise ValueError(f"ElsaConfig.{name}={value!r}: use one of {tuple(STORAGE_DTYPES)}.")
            if self.elsa_l and value == "float32":
                raise ValueError(
                    f"ElsaConfig.elsa_l=True stores z and u in low precision, but {name}='float32' was set: drop "
                    f"{name} (ELSA-L uses {ELSA_L[name]!r}), pick another of {tuple(STORAGE_DTYPES)[1:]}, "
                    "or set elsa_l=False."
                )
            if value is None:
                setattr(self, name, ELSA_L[name] if self.elsa_l else "float32")
        if not self.elsa_l:
            return
        optim = str(getattr(self.optim, "value", self.optim))
        if optim == _DEFAULT_OPTIM:
            self.optim = optim = ELSA_L["optim"]
        elif "8bit" not in optim:
            raise ValueError(
                f"ElsaConfig.elsa_l=True uses an 8-bit base optimizer, but optim={optim!r} is not one: leave optim "
                f"unset ({ELSA_L['optim']!r}), use another 8-bit one (e.g. 'adamw_torch_8bit'), or set elsa_l=False."
            )
        package = next((pkg for prefix, pkg in _OPTIM_PACKAGES.items() if optim.startswith(prefix)), "bitsandbytes")
        if importlib.util.find_spec(package) is None:
            install = ELSA_L_INSTALL if package == "bitsandbytes" else f"pip install {package}"
            raise ValueError(f"ElsaConfig.elsa_l=True uses optim={optim!r}, which needs {package}: {install}.")
        if package == "bitsandbytes" and self.importance == "adam":
            raise ValueError(
                f"ElsaConfig.importance='adam' reads Adam's exp_avg_sq, which optim={optim!r} keeps quantized under "
                "another name: use importance='activation' or 'magnitude' with elsa_l=True."
            )

    def admm_settings(self) -> AdmmSettings:
        """The optimizer wrapper's view of this config."""
        return AdmmSettings(
            sparsity=self.sparsity,
            sparsity_type=self.sparsity_type,
            interval=self.admm_interval,
            penalty=self.admm_penalty,
            lambda_schedule=self.admm_lambda_schedule,
            lambda_init=self.admm_lambda_init,
            lambda_final=self.admm_lambda,
            sparsity_schedule=self.sparsity_schedule,
            admm_fraction=self.admm_fraction,
            importance=self.importance,
            importance_alpha=self.importance_alpha,
            importance_delta=self.importance_delta,
            importance_beta=self.importance_beta,
            final_projection=self.final_projection,
            keep_mask=self.keep_mask,
            z_dtype=self.admm_z_dtype,
            u_dtype=self.admm_u_dtype,
        )

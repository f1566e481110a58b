"""hf_elsa: extreme sparsity for Hugging Face causal LMs with ELSA (surrogate-free ADMM)."""

from .compat import silence_upstream_noise
from .version import check_transformers_version

silence_upstream_noise()  # known-harmless upstream log lines (compat.UPSTREAM_NOISE), before transformers imports them
check_transformers_version()  # a warning when the installed transformers is outside the tested range

from .admm import ElsaOptimizer
from .allocation import SparsityAllocation
from .config import ElsaConfig
from .curvature import CurvatureEstimator
from .evaluation import perplexity
from .flatness import Sassha
from .inference import from_sparse_inference, to_sparse_inference
from .lora import merge_and_unload
from .memory import MemoryEstimate, estimate_memory
from .patterns import SparsityPattern, sparsity_pattern
from .projection import keep_mask, project
from .settings import ElsaSettings
from .sparse_io import (
    ElsaSparsityConfig,
    SparsityReport,
    apply_masks,
    attach_sparsity,
    detach_sparsity,
    load_sparse_model,
    record_evaluation,
    sparsity_report,
)
from .trainer import ElsaTrainer
from .version import __version__

__all__ = [
    "CurvatureEstimator",
    "ElsaConfig",
    "ElsaOptimizer",
    "ElsaSettings",
    "ElsaSparsityConfig",
    "ElsaTrainer",
    "MemoryEstimate",
    "Sassha",
    "SparsityAllocation",
    "SparsityPattern",
    "SparsityReport",
    "__version__",
    "apply_masks",
    "attach_sparsity",
    "detach_sparsity",
    "estimate_memory",
    "from_sparse_inference",
    "keep_mask",
    "load_sparse_model",
    "merge_and_unload",
    "perplexity",
    "project",
    "record_evaluation",
    "sparsity_pattern",
    "sparsity_report",
    "to_sparse_inference",
]

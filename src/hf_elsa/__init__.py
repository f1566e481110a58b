"""hf_elsa: extreme sparsity for Hugging Face causal LMs with ELSA (surrogate-free ADMM)."""

from .admm import AdmmSettings, ElsaOptimizer
from .config import ElsaConfig
from .evaluation import perplexity
from .flatness import Sassha
from .memory import MemoryEstimate, estimate_memory
from .projection import keep_mask, project
from .sparse_io import (
    ElsaSparsityConfig,
    SparsityReport,
    apply_masks,
    attach_sparsity,
    detach_sparsity,
    load_sparse_model,
    sparsity_report,
)
from .trainer import ElsaTrainer
from .version import __version__

__all__ = [
    "AdmmSettings",
    "ElsaConfig",
    "ElsaOptimizer",
    "ElsaSparsityConfig",
    "ElsaTrainer",
    "MemoryEstimate",
    "Sassha",
    "SparsityReport",
    "__version__",
    "apply_masks",
    "attach_sparsity",
    "detach_sparsity",
    "estimate_memory",
    "keep_mask",
    "load_sparse_model",
    "perplexity",
    "project",
    "sparsity_report",
]

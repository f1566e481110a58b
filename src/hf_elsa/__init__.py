"""hf_elsa: extreme sparsity for Hugging Face causal LMs with ELSA (surrogate-free ADMM)."""

__version__ = "0.1.0"

from ._logging import quiet_optional_kernel_warning

quiet_optional_kernel_warning()  # before transformers imports peft -> bitsandbytes

from .admm import ElsaOptimizer
from .allocation import SparsityAllocation
from .config import ElsaConfig
from .curvature import CurvatureEstimator
from .evaluation import perplexity
from .flatness import Sassha
from .lora import merge_and_unload
from .memory import MemoryEstimate, estimate_memory
from .patterns import SparsityPattern, sparsity_pattern
from .projection import keep_mask, project
from .settings import ElsaSettings
from .sparse_io import load_sparse_model, sparsity_report
from .trainer import ElsaTrainer

__all__ = [
    "CurvatureEstimator",
    "ElsaConfig",
    "ElsaOptimizer",
    "ElsaSettings",
    "ElsaTrainer",
    "MemoryEstimate",
    "Sassha",
    "SparsityAllocation",
    "SparsityPattern",
    "__version__",
    "estimate_memory",
    "keep_mask",
    "load_sparse_model",
    "merge_and_unload",
    "perplexity",
    "project",
    "sparsity_pattern",
    "sparsity_report",
]

"""hf_elsa: extreme sparsity for Hugging Face causal LMs with ELSA (surrogate-free ADMM)."""

__version__ = "0.1.0"

from .admm import AdmmSettings, ElsaOptimizer
from .config import ElsaConfig
from .evaluation import perplexity
from .flatness import Sassha
from .inference import to_sparse_inference
from .memory import MemoryEstimate, estimate_memory
from .projection import keep_mask, project
from .sparse_io import load_sparse_model, sparsity_report
from .trainer import ElsaTrainer

__all__ = [
    "AdmmSettings",
    "ElsaConfig",
    "ElsaOptimizer",
    "ElsaTrainer",
    "MemoryEstimate",
    "Sassha",
    "__version__",
    "estimate_memory",
    "keep_mask",
    "load_sparse_model",
    "perplexity",
    "project",
    "sparsity_report",
    "to_sparse_inference",
]

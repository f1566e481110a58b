"""hf_elsa: extreme sparsity for Hugging Face causal LMs with ELSA (surrogate-free ADMM)."""

__version__ = "0.1.0"

from .admm import AdmmSettings, ElsaOptimizer
from .config import ElsaConfig
from .evaluation import perplexity
from .projection import keep_mask, project
from .trainer import ElsaTrainer

__all__ = [
    "AdmmSettings",
    "ElsaConfig",
    "ElsaOptimizer",
    "ElsaTrainer",
    "keep_mask",
    "perplexity",
    "project",
    "__version__",
]

"""One-shot pruning baselines for any Hugging Face causal LM: magnitude, Wanda and SparseGPT.

Each function prunes the model in place (exact zeros) and returns ``{module_name: keep_mask}`` with
``True`` = kept, in the layout of the module's weight. The modules are those of
``hf_elsa.targets.find_prunable_modules`` and the sparsity patterns those of
``hf_elsa.projection.keep_mask``, so the masks plug into ELSA (warm start) and mask I/O as they are.
Each method is a :class:`OneShotPruner` registered in :data:`PRUNERS` by the module that defines it
(``ElsaConfig(admm_init=name)``, ``hf-elsa prune --method name``). See docs/oneshot.md.
"""

from .base import PRUNERS, OneShotPruner, get_pruner, register_pruner
from .magnitude import Magnitude, magnitude
from .sparsegpt import SparseGPT, sparsegpt, sparsegpt_prune_weight
from .wanda import Wanda, wanda, wanda_score

__all__ = [
    "PRUNERS",
    "Magnitude",
    "OneShotPruner",
    "SparseGPT",
    "Wanda",
    "get_pruner",
    "magnitude",
    "register_pruner",
    "sparsegpt",
    "sparsegpt_prune_weight",
    "wanda",
    "wanda_score",
]

"""One-shot pruning baselines for any Hugging Face causal LM: magnitude, Wanda and SparseGPT.

Each function prunes the model in place (exact zeros) and returns ``{module_name: keep_mask}`` with
``True`` = kept, in the layout of the module's weight. The modules are those of
``hf_elsa.targets.find_prunable_modules`` and the sparsity patterns those of
``hf_elsa.projection.keep_mask``, so the masks plug into ELSA (warm start) and mask I/O as they are.
See docs/oneshot.md.
"""

from .magnitude import magnitude
from .sparsegpt import sparsegpt, sparsegpt_prune_weight
from .wanda import wanda, wanda_score

__all__ = ["magnitude", "sparsegpt", "sparsegpt_prune_weight", "wanda", "wanda_score"]

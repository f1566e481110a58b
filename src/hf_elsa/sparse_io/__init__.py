"""Sparse checkpoints: masks and sparsity metadata that travel with a model (docs/checkpoints.md).

``attach_sparsity(model, masks, metadata)`` records the keep-masks of a pruned model on the instance and
patches its ``save_pretrained`` / ``push_to_hub`` so that a save writes, next to the usual files:

- ``config.json`` with an ``elsa_sparsity`` entry (method, target and achieved sparsity, pattern, targets,
  hf_elsa version);
- ``elsa_config.json``: versioned metadata that tolerates unknown keys (PEFT's convention), with the size
  and SHA-256 of every weight file, so a truncated, corrupted or foreign-rewritten file is caught on load;
- ``elsa_masks.safetensors``: one bit per weight, entropy-coded (:mod:`.masks`);
- ``README.md``: a model card (:mod:`.card`).

The modules, one concept each:

- :mod:`.metadata`: the ``elsa_config.json`` schema (:class:`ElsaSparsityConfig`) and file names;
- :mod:`.masks`: :class:`PackedMask`, the mask codec and the masks file;
- :mod:`.state`: what an attached model carries and the check of masks against weights;
- :mod:`.attach`: :func:`attach_sparsity`, :func:`detach_sparsity`, :func:`apply_masks`,
  :func:`record_evaluation`, the patched methods;
- :mod:`.formats`: the save-format registry (``"dense"``, ``"compressed"``), each format's write/read hooks;
- :mod:`.save`: the sparse ``save_pretrained``; :mod:`.commit`: the atomic swap into the target folder and the
  recovery after a killed save;
- :mod:`.hub`: uploads; :mod:`.load`: :func:`load_sparse_model` and verification;
- :mod:`.schema`: the one validation layer for what is parsed from a folder; :mod:`.files`: file helpers;
- :mod:`.report`: :func:`sparsity_report`; :mod:`.card`: the model card.
"""

from .attach import apply_masks, attach_sparsity, detach_sparsity, record_evaluation
from .card import build_model_card, write_model_card
from .commit import recover as finish_interrupted_save
from .formats import (
    COMPRESSED_NAME,
    COMPRESSED_NOTE,
    SaveFormat,
    get_format,
    read_compressed_state_dict,
    register_format,
    registered_formats,
)
from .load import load_sparse_model
from .masks import MASK_CODECS, PackedMask, read_masks
from .metadata import (
    CARD_NAME,
    CONFIG_KEY,
    ELSA_CONFIG_NAME,
    FORMAT_VERSION,
    MASKS_NAME,
    ElsaSparsityConfig,
    sparsity_metadata,
)
from .report import SparsityReport, TensorSparsity, sparsity_report
from .state import SparsityState, check_finite_weights, get_sparsity

FORMATS = registered_formats()  # the built-in formats; registered_formats() also lists formats added later

__all__ = [
    "CARD_NAME",
    "COMPRESSED_NAME",
    "COMPRESSED_NOTE",
    "CONFIG_KEY",
    "ELSA_CONFIG_NAME",
    "FORMATS",
    "FORMAT_VERSION",
    "MASKS_NAME",
    "MASK_CODECS",
    "ElsaSparsityConfig",
    "PackedMask",
    "SaveFormat",
    "SparsityReport",
    "SparsityState",
    "TensorSparsity",
    "apply_masks",
    "attach_sparsity",
    "build_model_card",
    "check_finite_weights",
    "detach_sparsity",
    "finish_interrupted_save",
    "get_format",
    "get_sparsity",
    "load_sparse_model",
    "read_compressed_state_dict",
    "read_masks",
    "record_evaluation",
    "register_format",
    "registered_formats",
    "sparsity_metadata",
    "sparsity_report",
    "write_model_card",
]

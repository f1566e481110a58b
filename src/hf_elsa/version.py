"""The hf_elsa version: one definition, read by ``setup.py`` and re-exported as ``hf_elsa.__version__``."""

__version__ = "0.1.0"

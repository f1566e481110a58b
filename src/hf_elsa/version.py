"""The hf_elsa version and the transformers releases it supports: one definition each, read by ``setup.py`` (which
does not import hf_elsa) and re-exported as ``hf_elsa.__version__``."""

import warnings

__version__ = "0.1.0"

# The transformers releases the test suite passed on (compat.py's touch points were checked across them). The upper
# bound is the first minor release not tested yet: it rises when the suite passes on it (README, "Supported versions").
TRANSFORMERS_REQUIREMENT = "transformers>=5.0,<5.26"
_WARNED_VERSIONS: set[str] = set()


def check_transformers_version(installed: str | None = None) -> bool:
    """Warn (once per process) when the installed transformers is outside the tested range; True when inside."""
    from packaging.requirements import Requirement

    if installed is None:
        import transformers

        installed = transformers.__version__
    spec = Requirement(TRANSFORMERS_REQUIREMENT).specifier
    if spec.contains(installed, prereleases=True):
        return True
    if installed not in _WARNED_VERSIONS:
        _WARNED_VERSIONS.add(installed)
        warnings.warn(
            f"hf_elsa {__version__} was tested with {TRANSFORMERS_REQUIREMENT}; transformers {installed} is installed. "
            "It may work (the private touch points are in hf_elsa/compat.py): run the test suite (make test) before "
            "relying on it, or install a tested release: pip install 'transformers" + str(spec) + "'.",
            UserWarning,
            stacklevel=2,
        )
    return False

"""pyproject.toml's filterwarnings: an upstream deprecation fails the suite; the known upstream-internal one does not."""

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["transformers.trainer", "torch.nn.modules.module", "hf_elsa.trainer"])
def test_a_deprecation_attributed_to_upstream_or_hf_elsa_is_an_error(category, module):
    with pytest.raises(category):
        warnings.warn_explicit("`old` is deprecated, use `new`", category, "x.py", 1, module=module)


def test_the_ignored_upstream_deprecation_is_ignored_only_where_it_is_raised():
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    with pytest.raises(FutureWarning):  # another deprecation of the same module still fails
        warnings.warn_explicit("`other` is deprecated", FutureWarning, "x.py", 1, module="transformers.modeling_utils")

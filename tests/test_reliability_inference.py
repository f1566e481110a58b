"""Sparse inference under what users do to a model afterwards: dtype changes, pickling, a second conversion,
mask helpers on a converted model, and odd measurement arguments (issue 22)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import make_model

from hf_elsa import to_sparse_inference
from hf_elsa.inference import KERNELS, SparseLinear, available_kernels, sparse_layers
from hf_elsa.oneshot import magnitude
from hf_elsa.sparse_io import apply_masks, attach_sparsity, get_sparsity, load_sparse_model, sparsity_report

CPU_KERNELS = [k for k, why in available_kernels().items() if not why]


def _pruned(seed=0):
    model = make_model("llama", seed=seed).eval()
    magnitude(model, 0.9, "unstructured")
    return model


def _attached(seed=0):
    model = _pruned(seed)
    masks = {n: p.ne(0) for n, p in model.named_parameters() if n.endswith("proj.weight")}
    attach_sparsity(model, masks, {"method": "magnitude", "sparsity": 0.9})
    return model


def _tokens():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


# -- dtype changes after the conversion ------------------------------------------------------------


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_converted_model_follows_a_dtype_change(kernel, dtype):
    """Each kernel was chosen for fp32; after ``.to(dtype)`` the model computes what the dense model in that
    dtype computes (a kernel that cannot read the new dtype is replaced, with a warning), never NaN."""
    model = _pruned()
    x = _tokens()
    dense = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        expected = dense(x).logits.double()
    to_sparse_inference(model, kernels=[kernel], force=True, prefill_tokens=None)
    assert sparse_layers(model)
    model.to(dtype)
    assert all(m.values.dtype == dtype for m in sparse_layers(model).values())
    with torch.no_grad(), _maybe_warns():
        got = model(x).logits
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    tolerance = {torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


@contextlib.contextmanager
def _maybe_warns():
    """A kernel that follows the dtype says nothing; one that is replaced warns (both are fine here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_half_and_double_methods_and_back_to_float():
    """The same conversions on the dense twin give the same logits at each step (fp16 rounding included)."""
    model = _pruned()
    dense = copy.deepcopy(model)
    x = _tokens()
    to_sparse_inference(model, kernels=["native_csr"] if "native_csr" in CPU_KERNELS else None, force=True)
    for name in ("half", "double", "float"):
        getattr(model, name)()
        getattr(dense, name)()
        with torch.no_grad(), _maybe_warns():
            got, expected = model(x).logits, dense(x).logits
        assert got.dtype == expected.dtype
        assert torch.isfinite(got).all()
        tolerance = 2e-2 if name == "half" else 1e-5
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_replaced_kernel_is_said_in_a_warning():
    if "native_csr" not in CPU_KERNELS:
        pytest.skip("native kernel not built here")
    model = _pruned()
    to_sparse_inference(model, kernels=["native_csr"], force=True)
    model.double()
    with pytest.warns(UserWarning, match=r"native_csr.*float64"):
        model(_tokens())


def test_the_native_kernel_refuses_buffers_it_cannot_read():
    """Defence in depth: binding the C kernel to fp16 values is an error, not fp16 bytes read as fp32."""
    if "native_csr" not in CPU_KERNELS:
        pytest.skip("native kernel not built here")
    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    layer = SparseLinear.from_linear(linear, [(1, "native_csr")])
    layer.values = layer.values.half()  # swapped behind the module's back: no _apply
    kernel = KERNELS["native_csr"]()
    with pytest.raises(ValueError, match="float16"):
        kernel.bind(layer)


# -- pickling and copies ---------------------------------------------------------------------------


def _round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.load", torch.load(buffer, weights_only=False)
    yield "pickle", pickle.loads(pickle.dumps(model))
    yield "deepcopy", copy.deepcopy(model)


@pytest.mark.parametrize("converted", [False, True], ids=["attached", "converted"])
def test_pickle_and_deepcopy_keep_the_masks_and_the_sparse_save(tmp_path, converted):
    model = _attached()
    x = _tokens()
    if converted:
        to_sparse_inference(model, force=True)
    assert "save_pretrained" in model.__dict__ or hasattr(type(model), "save_pretrained")
    with torch.no_grad():
        expected = model(x).logits
    for i, (how, twin) in enumerate(_round_trips(model)):
        assert twin is not model
        state = get_sparsity(twin)
        assert state is not None, how
        assert state is not get_sparsity(model), how
        # the sparse save is bound to the copy, not to the original
        assert twin.save_pretrained.__self__ is twin, how
        assert twin.push_to_hub.__self__ is twin, how
        with torch.no_grad():
            torch.testing.assert_close(twin(x).logits, expected, rtol=1e-6, atol=1e-6)
        out = tmp_path / f"copy{i}"
        twin.save_pretrained(out)
        assert (out / "elsa_masks.safetensors").is_file(), how
        loaded = load_sparse_model(out)
        assert get_sparsity(loaded).masks.keys() == get_sparsity(model).masks.keys()


def test_a_loaded_sparse_model_pickles(tmp_path):
    model = _attached()
    model.save_pretrained(tmp_path / "m")
    loaded = load_sparse_model(tmp_path / "m")
    twin = pickle.loads(pickle.dumps(loaded))
    twin.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "elsa_masks.safetensors").is_file()


def test_no_bound_method_in_the_instance_dict():
    """A ``types.MethodType`` in ``__dict__`` pickles as ``getattr(model, func.__name__)`` and breaks unpickling."""
    import types

    model = _attached()
    assert not [k for k, v in vars(model).items() if isinstance(v, types.MethodType)]


def test_the_sparse_save_keeps_its_signature_and_doc():
    import inspect

    model = _attached()
    params = inspect.signature(model.save_pretrained).parameters
    assert "compressed" in params and "format" in params and "self" not in params
    assert "hf_elsa sparse save" in model.save_pretrained.__doc__
    assert "compressed" in inspect.signature(model.push_to_hub).parameters


# -- mask helpers and a second conversion on a converted model -------------------------------------


def test_apply_masks_and_sparsity_report_on_a_converted_model():
    model = _attached()
    before = sparsity_report(model)
    to_sparse_inference(model, force=True)
    apply_masks(model)  # the converted layers store only kept weights: nothing to re-zero, no KeyError
    after = sparsity_report(model)
    assert after.sparsity == pytest.approx(before.sparsity)


def test_a_second_conversion_keeps_the_first_report():
    model = _pruned()
    to_sparse_inference(model, force=True)
    first = dict(model.hf_elsa_inference.layers)
    assert first
    to_sparse_inference(model, force=True)
    assert set(model.hf_elsa_inference.layers) >= set(first)
    assert all(model.hf_elsa_inference.layers[name].converted for name in first)


@pytest.mark.parametrize("repeats", [0, -1, 1.5])
def test_repeats_must_be_a_positive_int(repeats):
    with pytest.raises(ValueError, match="repeats"):
        to_sparse_inference(_pruned(), repeats=repeats)


@pytest.mark.parametrize("field", ["min_speedup", "prefill_min_speedup"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_speedup_thresholds_must_be_finite_and_not_negative(field, value):
    with pytest.raises(ValueError, match=field):
        to_sparse_inference(_pruned(), **{field: value})


@pytest.mark.parametrize("tokens", [(), (0,), (-3,), (1.5,)])
def test_token_counts_must_be_positive_ints(tokens):
    with pytest.raises(ValueError, match="tokens"):
        to_sparse_inference(_pruned(), tokens=tokens)

"""Low-precision storage of z and u (hf_elsa.states, ELSA-L): round-trip error, scale, support, optimizer use."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import ref_keep_mask

from hf_elsa.admm import SCALE_KEYS, AdmmSettings, ElsaOptimizer
from hf_elsa.states import STORAGE_DTYPES, pack, smallest_subnormal, unpack

FP8 = ("float8_e4m3fn", "float8_e5m2")
Z, U = "elsa_z", "elsa_u"


def _values(seed=0, n=2000):
    """Signed values spanning 12 decades, a few exact zeros (and a negative zero)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-8, 4, (n,), generator=gen).float()
    x[::97] = 0.0
    x[5] = -0.0
    return x


def _grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a float8 dtype, by enumerating its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return values[torch.isfinite(values)].unique()


# ---------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------
def test_dtype_names():
    assert tuple(STORAGE_DTYPES) == ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        pack(torch.ones(3), "float16")


def test_float32_is_stored_as_is():
    x = _values()
    stored, scale = pack(x, "float32")
    assert stored is x and scale is None
    assert unpack(stored, scale) is x


@pytest.mark.parametrize("name", FP8)
def test_fp8_scale_is_amax_based(name):
    dtype = STORAGE_DTYPES[name]
    x = _values()
    _, scale = pack(x, name)
    assert scale == pytest.approx(float(x.abs().max()) / torch.finfo(dtype).max * 1.05, rel=1e-6)
    assert pack(torch.zeros(4), name)[1] == 1e-8  # floor: an all-zero u has a usable scale
    assert pack(torch.full((4,), 1e-12), name)[1] == 1e-8
    stored, scale = pack(torch.zeros(4), name)
    assert stored.dtype == dtype and torch.equal(unpack(stored, scale), torch.zeros(4))


@pytest.mark.parametrize("name", FP8)
def test_fp8_rounds_to_the_nearest_representable_value(name):
    """Brute force: the stored value is the closest point of scale * (every fp8 value), or, for a nonzero
    value that would round to zero, the smallest subnormal of its sign (support preservation)."""
    dtype = STORAGE_DTYPES[name]
    x = torch.cat([_values(n=300), torch.tensor([3e-4, -2.5e-4, 1e-6])])
    stored, scale = pack(x, name)
    got = unpack(stored, scale)
    assert stored.dtype == dtype and stored.shape == x.shape
    points = _grid(dtype) * scale
    tiny = smallest_subnormal(dtype) * scale
    for xi, gi in zip(x.tolist(), got.tolist()):
        nearest = min(abs(p - xi) for p in points.tolist())
        if xi != 0 and abs(xi) < tiny:
            assert gi == pytest.approx(tiny if xi > 0 else -tiny, rel=1e-6)
        else:
            assert abs(gi - xi) <= nearest * (1 + 1e-6) + 1e-30, (xi, gi)


@pytest.mark.parametrize("name", ["bfloat16", *FP8])
def test_round_trip_error_bound(name):
    """|x - unpack(pack(x))| <= eps/2 * |x| in the normal range, <= one subnormal step * scale below it."""
    dtype = STORAGE_DTYPES[name]
    info = torch.finfo(dtype)
    x = _values(seed=1)
    stored, scale = pack(x, name)
    got = unpack(stored, scale)
    s = 1.0 if scale is None else scale
    bound = torch.maximum(info.eps / 2 * x.abs(), torch.full_like(x, smallest_subnormal(dtype) * s))
    assert bool(((got - x).abs() <= bound * (1 + 1e-6)).all())
    # and the bound is not vacuous: the relative error of the normal-range values does reach eps/4
    normal = x.abs() > info.smallest_normal * s
    assert float(((got - x).abs() / x.abs())[normal].max()) > info.eps / 4


@pytest.mark.parametrize("name", ["bfloat16", *FP8])
def test_support_survives_storage(name):
    """Zeros stay zero, every nonzero stays nonzero with its sign, whatever its size next to the largest."""
    x = torch.tensor([1.0, -1e-30, 3e-9, 0.0, -0.0, 0.25, -7e-12, 1e-44])  # 1e-44: below bf16's subnormals
    stored, scale = pack(x, name)
    got = unpack(stored, scale)
    assert torch.equal(got != 0, x != 0)
    assert torch.equal(torch.sign(got), torch.sign(x))
    assert torch.equal(stored != 0, x != 0)  # the stored codes themselves too


def test_unpack_to_the_parameter_dtype():
    x = _values()
    stored, scale = pack(x, "float8_e4m3fn")
    assert unpack(stored, scale, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# the optimizer reads and writes z and u through the storage
# ---------------------------------------------------------------------------------------------------
def _optimizer(weight, z_dtype, u_dtype, **settings):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    base = torch.optim.SGD(layer.parameters(), lr=0.05)
    s = AdmmSettings(sparsity=0.5, interval=1, lambda_final=0.5, z_dtype=z_dtype, u_dtype=u_dtype, **settings)
    return layer, ElsaOptimizer(base, {"layer": layer.weight}, s, total_steps=50)


def _step(layer, opt, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, layer.in_features, generator=gen)
    opt.zero_grad()
    layer(x).square().mean().backward()
    opt.step()


def test_state_is_stored_in_its_dtype_with_its_scale():
    torch.manual_seed(0)
    layer, opt = _optimizer(torch.randn(8, 16), "float8_e4m3fn", "bfloat16")
    for t in range(3):
        _step(layer, opt, t)
    st = opt.state[layer.weight]
    assert st[Z].dtype == torch.float8_e4m3fn and isinstance(st[SCALE_KEYS[Z]], float)
    assert st[U].dtype == torch.bfloat16 and SCALE_KEYS[U] not in st
    assert float(st[U].float().abs().max()) > 0  # u has been written with real values


@pytest.mark.parametrize("z_dtype", FP8)
def test_support_of_z_is_the_projection_mask(z_dtype):
    """A weight with outliers 1e11 times its other entries: FP8 alone would flush the kept small entries of
    z to zero. The stored z must still have exactly the projection's support, and a z-update that keeps
    the mask must count no flips."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 1e-3
    w[0, 0], w[3, 5] = 1e8, -2e8
    layer, opt = _optimizer(w, z_dtype, "float32", penalty="proximal")
    opt.initialize()
    expected = ref_keep_mask(w.abs(), 0.5, "unstructured")
    st = opt.state_for("layer")
    assert torch.equal(st[Z] != 0, expected)
    # one step with a zero gradient: the pull shrinks only the pruned entries, so the z-update after it
    # keeps the mask, and must count no flips
    layer.weight.grad = torch.zeros_like(w)
    opt.step()
    assert opt.metrics["elsa/mask_change"] == 0.0
    assert torch.equal(opt.state[layer.weight][Z] != 0, expected)


@pytest.mark.parametrize("penalty", ["gradient", "proximal"])
def test_low_precision_run_tracks_full_precision(penalty):
    """ELSA-L storage perturbs the trajectory by a bounded quantisation error, not more."""
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    runs = {}
    for key, dtypes in {"fp32": ("float32", "float32"), "lean": ("float8_e4m3fn", "bfloat16")}.items():
        layer, opt = _optimizer(w, *dtypes, penalty=penalty)
        for t in range(10):
            _step(layer, opt, t)
        runs[key] = layer.weight.detach().clone()
    rel = float((runs["lean"] - runs["fp32"]).norm() / runs["fp32"].norm())
    assert 0 < rel < 0.05


# ---------------------------------------------------------------------------------------------------
# several processes: one scale per tensor (max over ranks)
# ---------------------------------------------------------------------------------------------------
# Runs hf_elsa/states.py by path (it imports torch only) so each process starts in a second or two.
_WORKER = """
import importlib.util, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("states", sys.argv[1])
states = importlib.util.module_from_spec(spec)
spec.loader.exec_module(states)
rank, port, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
local = torch.full((4,), float(rank + 1))  # rank r holds amax r + 1
stored, scale = states.pack(local, "float8_e4m3fn")
torch.save({"scale": scale, "value": states.unpack(stored, scale)}, f"{out}/{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_fp8_scale_is_max_reduced_across_ranks(tmp_path):
    import subprocess
    import sys

    import hf_elsa.states

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), hf_elsa.states.__file__, str(rank), str(port), str(tmp_path)])
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    expected = 2.0 / 448.0 * 1.05
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["scale"] == pytest.approx(expected, rel=1e-6)  # rank 0 alone would use 1 / 448 * 1.05
        torch.testing.assert_close(got["value"], torch.full((4,), float(rank + 1)), rtol=2**-4, atol=0)

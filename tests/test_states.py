"""Low-precision storage of z and u (hf_elsa.states, ELSA-L): round-trip error, scale, support, optimizer use."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import ref_keep_mask

from hf_elsa import ElsaSettings
from hf_elsa.admm import RESIDUAL, SCALE_KEYS, ElsaOptimizer
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
    s = ElsaSettings(
        recipe="paper",
        sparsity=0.5,
        admm_interval=1,
        admm_lambda=0.5,
        admm_z_dtype=z_dtype,
        admm_u_dtype=u_dtype,
        **settings,
    )
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
    layer, opt = _optimizer(w, z_dtype, "float32", admm_penalty="proximal")
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
        layer, opt = _optimizer(w, *dtypes, admm_penalty=penalty)
        for t in range(10):
            _step(layer, opt, t)
        runs[key] = layer.weight.detach().clone()
    rel = float((runs["lean"] - runs["fp32"]).norm() / runs["fp32"].norm())
    assert 0 < rel < 0.05


@pytest.mark.parametrize("z_dtype", ["bfloat16", *FP8])
@pytest.mark.parametrize("u_dtype", ["float32", "bfloat16"])
def test_narrow_z_reads_back_with_its_residual(z_dtype, u_dtype):
    """u is zero on z's support, so its slots there hold z's rounding residual: z reads back to within u's
    rounding of that residual (exactly with an fp32 u), u reads back zero on the support."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    layer, opt = _optimizer(w, z_dtype, u_dtype)
    opt.initialize()
    exact = w * ref_keep_mask(w.abs(), 0.5, "unstructured")
    z, u = opt.z_and_u("layer")
    coarse = unpack(opt.state_for("layer")[Z], opt.state_for("layer").get(SCALE_KEYS[Z]))
    z_eps, u_eps = (torch.finfo(STORAGE_DTYPES[d]).eps for d in (z_dtype, u_dtype))
    # the stored codes alone are off by up to half of z's epsilon; with the residual, by its square
    assert float(((coarse - exact).abs() / exact.abs().clamp_min(1e-30)).max()) > z_eps / 4
    if u_dtype == "float32":
        assert torch.equal(z, exact)
    else:
        assert bool(((z - exact).abs() <= exact.abs() * (z_eps / 2) * (u_eps / 2) * 1.01).all())
    assert torch.equal(u, torch.zeros_like(u))
    for t in range(4):
        _step(layer, opt, t)
        z, u = opt.z_and_u("layer")
        assert torch.equal(u[z != 0], torch.zeros_like(u[z != 0])) and float(u.abs().max()) > 0


def test_fixed_mask_drops_every_admm_storage_key():
    """After the ADMM phase only the boolean mask remains: z, u, their scales and the residual flag are gone."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    layer, opt = _optimizer(w, "float8_e4m3fn", "bfloat16", admm_fraction=0.1)
    for t in range(6):
        _step(layer, opt, t)
    st = opt.state[layer.weight]
    assert st["elsa_mask"].dtype == torch.bool
    assert not {Z, U, RESIDUAL, *SCALE_KEYS.values()} & set(st)


def test_fp8_z_with_fp32_u_follows_the_fp32_trajectory():
    """With the residual in an fp32 u, an FP8 z is as good as an fp32 one: the runs agree to rounding."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    runs = {}
    for z_dtype in ("float32", "float8_e4m3fn"):
        layer, opt = _optimizer(w, z_dtype, "float32", admm_penalty="proximal")
        for t in range(10):
            _step(layer, opt, t)
        runs[z_dtype] = layer.weight.detach().clone()
    torch.testing.assert_close(runs["float8_e4m3fn"], runs["float32"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("saved", "loaded"), [("float32", "float8_e4m3fn"), ("float8_e4m3fn", "float32")])
def test_state_converts_between_storage_formats_on_load(saved, loaded):
    """Resuming an fp32 run as ELSA-L (or back): z and u keep their values, in the new run's format."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    layer, opt = _optimizer(w, saved, "bfloat16" if saved != "float32" else "float32")
    for t in range(3):
        _step(layer, opt, t)
    z_saved, u_saved = opt.z_and_u("layer")
    layer2, opt2 = _optimizer(w, loaded, "bfloat16" if loaded != "float32" else "float32")
    with torch.no_grad():
        layer2.weight.copy_(layer.weight)
    opt2.load_state_dict(opt.state_dict())
    st = opt2.state_for("layer")
    assert st[Z].dtype == STORAGE_DTYPES[loaded] and (SCALE_KEYS[Z] in st) == (loaded != "float32")
    z, u = opt2.z_and_u("layer")
    if loaded == "float32":  # fp32 holds the decoded values exactly
        assert torch.equal(z, z_saved) and torch.equal(u, u_saved)
    else:  # z to bf16-of-its-residual precision, u to bf16's
        torch.testing.assert_close(z, z_saved, rtol=2**-12, atol=0)  # e4m3 eps/2 * bf16 eps/2
        # the fp32 run's u carries rounding noise on the support (u + W - (W + u)); the new format drops it
        off = z_saved == 0
        torch.testing.assert_close(u[off], u_saved[off], rtol=2**-8, atol=0)
        assert torch.equal(u[~off], torch.zeros_like(u[~off]))
    assert torch.equal(z != 0, z_saved != 0)
    _step(layer2, opt2, 3)  # and the run goes on from there


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
result = {"scale": scale, "value": states.unpack(stored, scale)}
# a DTensor sharded over the two ranks (FSDP2's layout): one scale, the same values as packing the whole tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
full = torch.tensor([[1e-12, 3.0], [0.0, -0.5], [2.0, 1e-3], [100.0, 0.0]])
sharded, sharded_scale = states.pack(distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(0)]), "float8_e4m3fn")
result.update({"sharded_scale": sharded_scale, "sharded_dtype": sharded.dtype,
               "sharded_value": states.unpack(sharded, sharded_scale).full_tensor()})
torch.save(result, f"{out}/{rank}.pt")
dist.barrier()  # neither rank tears gloo down while the other still talks to it (one rank aborted without this)
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
    full = torch.tensor([[1e-12, 3.0], [0.0, -0.5], [2.0, 1e-3], [100.0, 0.0]])
    whole, whole_scale = pack(full, "float8_e4m3fn")
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["scale"] == pytest.approx(expected, rel=1e-6)  # rank 0 alone would use 1 / 448 * 1.05
        torch.testing.assert_close(got["value"], torch.full((4,), float(rank + 1)), rtol=2**-4, atol=0)
        assert got["sharded_scale"] == whole_scale and got["sharded_dtype"] == torch.float8_e4m3fn
        assert torch.equal(got["sharded_value"], unpack(whole, whole_scale))
        assert torch.equal(got["sharded_value"] != 0, full != 0)


# ---------------------------------------------------------------------------------------------------
# ElsaConfig: storage dtypes and the ELSA-L preset
# ---------------------------------------------------------------------------------------------------
def _config(**kwargs):
    from hf_elsa import ElsaConfig

    return ElsaConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_config_defaults_and_preset():
    plain = _config()
    assert (plain.admm_z_dtype, plain.admm_u_dtype, str(plain.optim.value)) == (
        "float32",
        "float32",
        "adamw_torch_fused",
    )
    lean = _config(elsa_l=True)
    assert (lean.admm_z_dtype, lean.admm_u_dtype, str(lean.optim.value)) == (
        "float8_e4m3fn",
        "bfloat16",
        "adamw_bnb_8bit",
    )
    settings = lean.elsa_settings()
    assert (settings.admm_z_dtype, settings.admm_u_dtype) == ("float8_e4m3fn", "bfloat16")
    # explicit choices win over the preset
    custom = _config(elsa_l=True, admm_z_dtype="float8_e5m2", optim="paged_adamw_8bit")
    assert (custom.admm_z_dtype, custom.admm_u_dtype, str(custom.optim.value)) == (
        "float8_e5m2",
        "bfloat16",
        "paged_adamw_8bit",
    )
    assert _config(admm_u_dtype="bfloat16").admm_z_dtype == "float32"


def test_config_command_line():
    from transformers import HfArgumentParser

    from hf_elsa import ElsaConfig

    (config,) = HfArgumentParser(ElsaConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--elsa_l", "true", "--admm_u_dtype", "float8_e5m2"]
    )
    assert (config.admm_z_dtype, config.admm_u_dtype, str(config.optim.value)) == (
        "float8_e4m3fn",
        "float8_e5m2",
        "adamw_bnb_8bit",
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"admm_z_dtype": "fp8"}, r"admm_z_dtype='fp8': use one of \('float32', 'bfloat16'"),
        ({"admm_u_dtype": "float16"}, "admm_u_dtype='float16'"),
        ({"elsa_l": True, "admm_z_dtype": "float32"}, "elsa_l=True stores z and u in low precision"),
        ({"elsa_l": True, "optim": "adamw_torch"}, "optim='adamw_torch' is not one"),
        ({"elsa_l": True, "importance": "adam"}, "importance='adam' reads Adam's exp_avg_sq"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_preset_names_the_install_command_when_bitsandbytes_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install \"hf_elsa\[elsa-l\]\""):
        _config(elsa_l=True)


# ---------------------------------------------------------------------------------------------------
# ELSA-L end to end: resume from a checkpoint with FP8 state continues exactly
# ---------------------------------------------------------------------------------------------------
def test_elsa_l_resume_continues_exactly(tmp_path):
    import warnings

    from conftest import elsa_args, lm_dataset, make_model
    from transformers import TrainerCallback

    from hf_elsa import ElsaTrainer

    n = 8
    dataset = lm_dataset(32)
    # u in e5m2 too, so both scales go through the checkpoint; hidden 64 puts some weights in 8-bit Adam state
    common = {"max_steps": n, "admm_fraction": 0.75, "admm_interval": 2, "learning_rate": 3e-3, "elsa_l": True}
    common["admm_u_dtype"] = "float8_e5m2"
    tiny = {"hidden": 64, "intermediate": 128}

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= n // 2

    class RecordState(TrainerCallback):
        def __init__(self):
            self.seen = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.seen:
                st = trainer.optimizer.state[next(iter(trainer.elsa_optimizer.prunable.values()))]
                self.seen.update({k: (st[k].dtype, st[SCALE_KEYS[k]]) for k in (Z, U)})

    def train(model, args, resume=None, callbacks=(), **kwargs):
        nonlocal trainer
        trainer = ElsaTrainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks), **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer.train(resume_from_checkpoint=resume)
        return trainer

    trainer = None
    straight = make_model("llama", seed=0, **tiny)
    train(straight, elsa_args(tmp_path / "a", **common))
    interrupted = make_model("llama", seed=0, **tiny)
    train(
        interrupted, elsa_args(tmp_path / "b", save_strategy="steps", save_steps=n // 2, **common), callbacks=[StopAt()]
    )
    resumed = make_model("llama", seed=1, **tiny)
    record = RecordState()
    # the student from the checkpoint, the dense teacher given (checkpoints never hold it)
    train(
        resumed,
        elsa_args(tmp_path / "c", **common),
        str(tmp_path / "b" / "out" / f"checkpoint-{n // 2}"),
        [record],
        teacher_model=make_model("llama", seed=0, **tiny),
    )
    assert trainer.state.global_step == n
    # load_state_dict's cast to the parameter dtype was undone, and the scales came back
    assert record.seen[Z][0] == torch.float8_e4m3fn and record.seen[U][0] == torch.float8_e5m2
    assert all(isinstance(scale, float) and scale >= 1e-8 for _, scale in record.seen.values())
    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)

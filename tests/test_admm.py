"""ElsaOptimizer (ADMM around a base optimizer) and the schedules, against hand computations.

A reference ADMM is written here from the spec for a plain-SGD base optimizer (no momentum), where one
step is W <- W - lr * grad, so every quantity can be computed by hand.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import ref_keep_mask, ref_project
from torch import nn

from hf_elsa import ElsaOptimizer, ElsaSettings
from hf_elsa.admm import lambda_at, sparsity_at

Z, U, MASK, STEP, LAMBDA = "elsa_z", "elsa_u", "elsa_mask", "elsa_step", "elsa_lambda"


# ---------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 1, 5, 9, 10])
def test_lambda_constant(t):
    assert lambda_at("constant", t, 10, 0.3, 0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("t", [0, 1, 3, 5, 10])
def test_lambda_linear(t):
    assert lambda_at("linear", t, 10, 0.0, 2.0) == pytest.approx(0.0 + 2.0 * t / 10)


@pytest.mark.parametrize("t", [0, 2, 5, 7, 10])
def test_lambda_cosine(t):
    lo, hi, total = 0.1, 1.1, 10
    expected = lo + (hi - lo) * (1 - math.cos(math.pi * t / total)) / 2
    assert lambda_at("cosine", t, total, lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize("t", [0, 1, 4, 8])
def test_lambda_exponential(t):
    lo, hi, total = 1e-3, 1.0, 8
    assert lambda_at("exponential", t, total, lo, hi) == pytest.approx(lo * (hi / lo) ** (t / total))


def test_lambda_endpoints():
    for schedule in ("linear", "cosine", "exponential"):
        assert lambda_at(schedule, 0, 50, 0.01, 0.5) == pytest.approx(0.01)
        assert lambda_at(schedule, 50, 50, 0.01, 0.5) == pytest.approx(0.5)


def test_lambda_exponential_needs_positive_start():
    with pytest.raises(ValueError):
        lambda_at("exponential", 3, 10, 0.0, 1.0)


def test_lambda_unknown_schedule():
    with pytest.raises(ValueError):
        lambda_at("step", 3, 10, 0.0, 1.0)


@pytest.mark.parametrize("t", [0, 1, 3, 7, 10, 12])
def test_sparsity_schedules(t):
    assert sparsity_at("constant", t, 10, 0.7) == pytest.approx(0.7)
    expected = 0.7 * (1 - (1 - min(t, 10) / 10) ** 3)
    assert sparsity_at("cubic", t, 10, 0.7) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _linear(seed=0, out_f=4, in_f=8, bias=False):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _grads(n, shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def _elsa(layer, base, total_steps=20, **settings):
    defaults = {
        "recipe": "paper",
        "sparsity": 0.5,
        "admm_interval": 3,
        "admm_penalty": "gradient",
        "admm_lambda_schedule": "constant",
        "admm_lambda": 0.5,
        "sparsity_schedule": "constant",
        "admm_fraction": 1.0,
    }
    defaults.update(settings)
    return ElsaOptimizer(base, {"layer": layer.weight}, ElsaSettings(**defaults), total_steps=total_steps)


def _step_with_grad(opt, param, grad):
    param.grad = grad.clone()
    opt.step()


def simulate_sgd(w0, grads, lr, s, interval, lam, admm_steps, penalty="gradient", sparsity_type="unstructured"):
    """Reference ADMM from the spec with SGD as the base optimizer; returns [(W, z, u)] after each step."""
    w = w0.clone()
    z = ref_project(w, s, sparsity_type)
    u = torch.zeros_like(w)
    mask = None
    out = []
    for t, g in enumerate(grads):
        if t < admm_steps:
            if penalty == "gradient":
                w = w - lr * (g + lam * (w - z + u))
            else:
                w = w - lr * g
                w = w - lam / (1 + lam) * (w - z + u)
            if t % interval == 0:
                z = ref_project(w + u, s, sparsity_type)
                u = u + w - z
            if t + 1 == admm_steps:
                mask = ref_keep_mask(w.abs(), s, sparsity_type)
                w = w * mask
        else:
            w = (w - lr * g) * mask
        out.append((w.clone(), z.clone(), u.clone()))
    return out


# ---------------------------------------------------------------------------------------------------
# one step by hand
# ---------------------------------------------------------------------------------------------------
def test_gradient_penalty_first_step_sgd():
    layer = _linear()
    w0 = layer.weight.detach().clone()
    lr, lam, s = 0.1, 0.5, 0.5
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=lr), sparsity=s, admm_lambda=lam)
    g = _grads(1, w0.shape)[0]
    _step_with_grad(opt, layer.weight, g)

    z0 = ref_project(w0, s)  # magnitude projection of W at the final sparsity, u0 = 0
    w1 = w0 - lr * (g + lam * (w0 - z0))
    torch.testing.assert_close(layer.weight.detach(), w1, rtol=0, atol=1e-6)
    # the first z/u update follows the first step
    st = opt.state[layer.weight]
    z1 = ref_project(w1, s)
    torch.testing.assert_close(st[Z], z1, rtol=0, atol=1e-6)
    torch.testing.assert_close(st[U], w1 - z1, rtol=0, atol=1e-6)
    assert st[STEP] == 1
    assert st[LAMBDA] == pytest.approx(lam)
    # the penalty was added to the gradient that was present
    torch.testing.assert_close(layer.weight.grad, g + lam * (w0 - z0), rtol=0, atol=1e-6)


def test_gradient_penalty_when_grad_is_none():
    """A prunable weight without a task gradient still gets the penalty."""
    layer = _linear()
    w0 = layer.weight.detach().clone()
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=0.1), admm_lambda=1.0)
    layer.weight.grad = None
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1 * (w0 - ref_project(w0, 0.5)), rtol=0, atol=1e-6)


def test_cubic_sparsity_ramp_starts_z0_dense():
    """With the cubic ramp the z0 target is 0% sparse: z0 = W0, so the first penalty is zero."""
    layer = _linear()
    w0 = layer.weight.detach().clone()
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=0.1), sparsity_schedule="cubic", admm_lambda=1.0)
    g = _grads(1, w0.shape)[0]
    _step_with_grad(opt, layer.weight, g)
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1 * g, rtol=0, atol=1e-6)
    # and the first z-update uses a target strictly between 0 and the final sparsity
    zeros = int((opt.state[layer.weight][Z] == 0).sum())
    assert 0 < zeros < round(0.5 * w0.numel())


def test_adam_base_first_step():
    layer = _linear()
    w0 = layer.weight.detach().clone()
    lr, lam, s = 1e-2, 0.3, 0.5
    base = torch.optim.Adam(layer.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    opt = _elsa(layer, base, sparsity=s, admm_lambda=lam)
    g = _grads(1, w0.shape)[0] * 1e-2
    _step_with_grad(opt, layer.weight, g)

    ref = nn.Parameter(w0.clone())
    ref_opt = torch.optim.Adam([ref], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    ref.grad = g + lam * (w0 - ref_project(w0, s))
    ref_opt.step()
    torch.testing.assert_close(layer.weight.detach(), ref.detach(), rtol=0, atol=1e-6)


def test_proximal_penalty_first_step():
    layer = _linear()
    w0 = layer.weight.detach().clone()
    lr, lam, s = 0.1, 0.5, 0.5
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=lr), sparsity=s, admm_lambda=lam, admm_penalty="proximal")
    g = _grads(1, w0.shape)[0]
    _step_with_grad(opt, layer.weight, g)
    z0 = ref_project(w0, s)
    wb = w0 - lr * g  # the base step sees the task gradient only
    w1 = wb - lam / (1 + lam) * (wb - z0)
    torch.testing.assert_close(layer.weight.detach(), w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize("penalty", ["gradient", "proximal"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "row", "2:4"])
def test_trajectory_matches_reference(penalty, sparsity_type):
    """Several steps: z/u updates every `interval` steps starting after the first, the hard projection at
    admm_steps = round(admm_fraction * total_steps), then a fixed mask."""
    layer = _linear(out_f=4, in_f=8)
    w0 = layer.weight.detach().clone()
    lr, lam, s, interval, total, fraction = 0.05, 0.4, 0.5, 3, 12, 0.6
    admm_steps = round(fraction * total)  # 7
    opt = _elsa(
        layer,
        torch.optim.SGD(layer.parameters(), lr=lr),
        total_steps=total,
        sparsity=s,
        admm_interval=interval,
        admm_lambda=lam,
        admm_fraction=fraction,
        admm_penalty=penalty,
        sparsity_type=sparsity_type,
    )
    grads = _grads(total, w0.shape, seed=7)
    expected = simulate_sgd(w0, grads, lr, s, interval, lam, admm_steps, penalty, sparsity_type)
    for t, g in enumerate(grads):
        _step_with_grad(opt, layer.weight, g)
        w_ref, z_ref, u_ref = expected[t]
        torch.testing.assert_close(layer.weight.detach(), w_ref, rtol=0, atol=1e-5, msg=f"W after step {t + 1}")
        st = opt.state[layer.weight]
        if t + 1 < admm_steps:
            torch.testing.assert_close(st[Z], z_ref, rtol=0, atol=1e-5, msg=f"z after step {t + 1}")
            torch.testing.assert_close(st[U], u_ref, rtol=0, atol=1e-5, msg=f"u after step {t + 1}")


def test_exactly_sparse_after_admm_steps_and_mask_stays_fixed():
    layer = _linear(out_f=8, in_f=16)
    s, total, fraction = 0.7, 10, 0.5
    admm_steps = round(fraction * total)
    opt = _elsa(
        layer,
        torch.optim.Adam(layer.parameters(), lr=1e-2),
        total_steps=total,
        sparsity=s,
        admm_interval=2,
        admm_fraction=fraction,
    )
    grads = _grads(total, layer.weight.shape, seed=3)
    k = round(layer.weight.numel() * s)
    zero_pattern = None
    for t, g in enumerate(grads):
        before = layer.weight.detach().clone()
        _step_with_grad(opt, layer.weight, g)
        w = layer.weight.detach()
        if t + 1 < admm_steps:
            assert int((w == 0).sum()) < k
        elif t + 1 == admm_steps:
            assert int((w == 0).sum()) == k
            zero_pattern = w == 0
            assert opt.masks()["layer"].dtype == torch.bool
            assert torch.equal(opt.masks()["layer"], ~zero_pattern)
        else:
            assert torch.equal(w == 0, zero_pattern), f"mask changed at step {t + 1}"
            assert not torch.equal(w, before), "kept weights must still train"
    assert not opt.in_admm_phase


def test_final_hard_projection_is_of_w_not_z():
    """End of ADMM: W <- Proj(W), not W <- z."""
    layer = _linear(out_f=4, in_f=8)
    lr, s = 0.1, 0.5
    opt = _elsa(
        layer,
        torch.optim.SGD(layer.parameters(), lr=lr),
        total_steps=4,
        sparsity=s,
        admm_interval=1,
        admm_lambda=0.01,
        admm_fraction=1.0,
    )
    grads = _grads(4, layer.weight.shape, seed=11)
    for g in grads[:3]:
        _step_with_grad(opt, layer.weight, g)
    st = opt.state[layer.weight]
    w, z, u = layer.weight.detach().clone(), st[Z].clone(), st[U].clone()
    _step_with_grad(opt, layer.weight, grads[3])
    w_before_projection = w - lr * (grads[3] + 0.01 * (w - z + u))
    torch.testing.assert_close(layer.weight.detach(), ref_project(w_before_projection, s), rtol=0, atol=1e-6)


def test_final_projection_off_leaves_weights_dense():
    layer = _linear()
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=0.1), total_steps=3, final_projection=False)
    for g in _grads(3, layer.weight.shape):
        _step_with_grad(opt, layer.weight, g)
    assert int((layer.weight == 0).sum()) == 0


def test_admm_fraction_zero_prunes_at_start():
    """admm_fraction = 0: magnitude pruning + masked fine-tuning (the mask is fixed before the first step)."""
    layer = _linear(out_f=4, in_f=8)
    w0 = layer.weight.detach().clone()
    lr = 0.1
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=lr), total_steps=5, admm_fraction=0.0)
    g = _grads(1, w0.shape)[0]
    _step_with_grad(opt, layer.weight, g)
    mask = ref_keep_mask(w0.abs(), 0.5, "unstructured")
    torch.testing.assert_close(layer.weight.detach(), (w0 - lr * g) * mask, rtol=0, atol=1e-6)


def test_metrics_follow_their_definitions():
    """Logged diagnostics after a z-update: lambda, ||W - z|| / ||W||, mask change between consecutive z,
    fraction of exact zeros in W."""
    layer = _linear(out_f=8, in_f=8)
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=0.5), total_steps=20, admm_interval=1, admm_lambda=0.3)
    grads = _grads(3, layer.weight.shape, seed=13)
    _step_with_grad(opt, layer.weight, grads[0])
    for g in grads[1:]:
        z_old = opt.state[layer.weight][Z].clone()
        _step_with_grad(opt, layer.weight, g)
        w, z = layer.weight.detach(), opt.state[layer.weight][Z]
        m = opt.metrics
        assert m["elsa/lambda"] == pytest.approx(0.3)
        assert m["elsa/primal_residual"] == pytest.approx(float((w - z).norm() / w.norm()), rel=1e-5)
        flips = float(((z_old != 0) != (z != 0)).float().mean())
        assert m["elsa/mask_change"] == pytest.approx(flips, abs=1e-9)
        assert m["elsa/weight_sparsity"] == pytest.approx(float((w == 0).float().mean()), abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# lambda schedule inside the optimizer: dual rescale
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,lam0,lam1", [("linear", 0.1, 1.0), ("exponential", 1e-2, 1.0), ("cosine", 0.5, 0.05)]
)
def test_dual_rescaled_when_lambda_changes(schedule, lam0, lam1):
    layer = _linear()
    s = 0.5
    opt = _elsa(
        layer,
        torch.optim.SGD(layer.parameters(), lr=0.1),
        total_steps=12,
        sparsity=s,
        admm_interval=1,
        admm_lambda_schedule=schedule,
        admm_lambda_init=lam0,
        admm_lambda=lam1,
        admm_fraction=1.0,
    )
    grads = _grads(11, layer.weight.shape, seed=5)
    _step_with_grad(opt, layer.weight, grads[0])
    changed = 0
    for g in grads[1:]:
        st = opt.state[layer.weight]
        lam_old, u_old, z_old = st[LAMBDA], st[U].clone(), st[Z].clone()
        w_old = layer.weight.detach().clone()
        _step_with_grad(opt, layer.weight, g)
        w = layer.weight.detach()
        # the x-step used the old lambda
        torch.testing.assert_close(w, w_old - 0.1 * (g + lam_old * (w_old - z_old + u_old)), rtol=0, atol=1e-6)
        lam_new = st[LAMBDA]
        z_new = ref_project(w + u_old, s)
        torch.testing.assert_close(st[Z], z_new, rtol=0, atol=1e-6)
        torch.testing.assert_close(st[U], (u_old + w - z_new) * (lam_old / lam_new), rtol=1e-5, atol=1e-6)
        changed += lam_new != pytest.approx(lam_old)
    assert changed >= 5
    assert st[LAMBDA] != pytest.approx(lam0)


def test_lambda_from_zero_does_not_zero_the_dual():
    """Known defect of the released code: a schedule from 0 zeroes u through the rescale."""
    layer = _linear()
    opt = _elsa(
        layer,
        torch.optim.SGD(layer.parameters(), lr=0.1),
        total_steps=10,
        admm_interval=1,
        admm_lambda_schedule="linear",
        admm_lambda_init=0.0,
        admm_lambda=1.0,
    )
    for g in _grads(4, layer.weight.shape, seed=2):
        _step_with_grad(opt, layer.weight, g)
        st = opt.state[layer.weight]
        assert torch.isfinite(st[U]).all()
        assert float(st[U].abs().sum()) > 0, "u was zeroed"
    assert st[LAMBDA] > 0


def test_lambda_to_zero_is_guarded():
    layer = _linear()
    opt = _elsa(
        layer,
        torch.optim.SGD(layer.parameters(), lr=0.1),
        total_steps=6,
        admm_interval=1,
        admm_lambda_schedule="linear",
        admm_lambda_init=1.0,
        admm_lambda=0.0,
    )
    for g in _grads(6, layer.weight.shape, seed=2):
        _step_with_grad(opt, layer.weight, g)
        assert torch.isfinite(layer.weight).all()
        st = opt.state[layer.weight]
        if U in st:
            assert torch.isfinite(st[U]).all()


# ---------------------------------------------------------------------------------------------------
# objective-aware projection with Adam's second moment
# ---------------------------------------------------------------------------------------------------
def test_adam_importance_uses_second_moment():
    """importance='adam' with a plain torch Adam (the released code crashes here): after the first step,
    exp_avg_sq = (1 - beta2) g^2, so z1 keeps the top-k of g^2 * v^2 where g is the penalised gradient."""
    layer = _linear(out_f=4, in_f=8)
    w0 = layer.weight.detach().clone()
    lam, s = 0.5, 0.5
    base = torch.optim.Adam(layer.parameters(), lr=1e-2, betas=(0.9, 0.95))
    opt = _elsa(layer, base, sparsity=s, admm_lambda=lam, importance="adam")
    g = _grads(1, w0.shape, seed=9)[0]
    _step_with_grad(opt, layer.weight, g)
    g_total = g + lam * (w0 - ref_project(w0, s))  # z0 uses magnitude: no second moment yet
    v = layer.weight.detach()  # + u0 = 0
    mask = ref_keep_mask((0.05 * g_total.double() ** 2 + 1e-12) * v.double() ** 2, s, "unstructured")
    assert torch.equal(opt.state[layer.weight][Z], v * mask)
    assert not torch.equal(mask, ref_keep_mask(v.abs(), s, "unstructured")), "test cannot tell adam from magnitude"


# ---------------------------------------------------------------------------------------------------
# keep_mask
# ---------------------------------------------------------------------------------------------------
def test_keep_mask_reads_existing_zeros():
    layer = _linear(out_f=8, in_f=8)
    gen = torch.Generator().manual_seed(4)
    zeros = torch.rand(layer.weight.shape, generator=gen) < 0.6
    with torch.no_grad():
        layer.weight[zeros] = 0
    w0 = layer.weight.detach().clone()
    lr = 0.1
    # sparsity 0.5 is deliberately different from the existing 60%: keep_mask must not use it
    opt = _elsa(layer, torch.optim.SGD(layer.parameters(), lr=lr), total_steps=5, sparsity=0.5, keep_mask=True)
    grads = _grads(5, w0.shape, seed=6)
    w = w0
    for g in grads:
        _step_with_grad(opt, layer.weight, g)
        w = (w - lr * g) * ~zeros  # plain SGD on the kept entries, no penalty
        torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=1e-6)
    assert torch.equal(layer.weight == 0, zeros)


# ---------------------------------------------------------------------------------------------------
# state_dict round trip
# ---------------------------------------------------------------------------------------------------
def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model


def _batches(n, seed=21):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(n)]


def _make_opt(model, total):
    base = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    settings = ElsaSettings(
        recipe="paper",
        sparsity=0.7,
        admm_interval=2,
        admm_penalty="gradient",
        admm_lambda_schedule="linear",
        admm_lambda_init=0.05,
        admm_lambda=1.0,
        sparsity_schedule="cubic",
        admm_fraction=0.6,
    )
    prunable = {"0": model[0].weight, "2": model[2].weight}
    return ElsaOptimizer(base, prunable, settings, total_steps=total)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("split", [3, 8])  # inside the ADMM phase (admm_steps = 6) and in the fixed-mask phase
def test_state_dict_round_trip_continues_identically(split):
    total = 10
    batches = _batches(total)
    model = _problem()
    opt = _make_opt(model, total)
    _train(model, opt, batches[:split])

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    fresh = _problem(seed=123)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = _make_opt(fresh, total)
    fresh_opt.load_state_dict(ckpt["optim"])

    for name, p in (("0", model[0].weight), ("2", model[2].weight)):
        q = dict(fresh.named_parameters())[f"{name}.weight"]
        a, b = opt.state[p], fresh_opt.state[q]
        assert b[STEP] == a[STEP] == split
        for key in (Z, U, LAMBDA, MASK):
            assert (key in a) == (key in b), key
        if split < 6:
            assert torch.equal(a[Z], b[Z]) and torch.equal(a[U], b[U])
            assert b[LAMBDA] == a[LAMBDA]
        else:
            assert b[MASK].dtype == torch.bool
            assert torch.equal(a[MASK], b[MASK])

    _train(model, opt, batches[split:])
    _train(fresh, fresh_opt, batches[split:])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)
    for w in (fresh[0].weight, fresh[2].weight):
        assert int((w == 0).sum()) == round(w.numel() * 0.7)


# ---------------------------------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------------------------------
def test_prunable_weight_must_be_in_base_optimizer():
    a, b = _linear(seed=0), _linear(seed=1)
    with pytest.raises(ValueError):
        ElsaOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), {"b": b.weight}, ElsaSettings(recipe="paper"))


def test_no_prunable_weights_raises():
    a = _linear()
    with pytest.raises(ValueError):
        ElsaOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), {}, ElsaSettings(recipe="paper"))


def test_total_steps_required():
    a = _linear()
    opt = ElsaOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), {"a": a.weight}, ElsaSettings(recipe="paper"))
    a.weight.grad = torch.zeros_like(a.weight)
    with pytest.raises(RuntimeError):
        opt.step()


@pytest.mark.parametrize(
    "field,value",
    [
        ("admm_penalty", "l1"),
        ("admm_lambda_schedule", "step"),
        ("sparsity_schedule", "linear"),
        ("sparsity_type", "3:2"),
        ("sparsity_type", "0:4"),
    ],
)
def test_settings_validation(field, value):
    with pytest.raises(ValueError):
        ElsaSettings(**{field: value})

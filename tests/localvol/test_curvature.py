"""Curvature builders: exact Hessian against closed forms, HesScale against the exact diagonal."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector

from localvol.curvature import hessian, hessian_diagonal, hesscale_diagonal


def _batched_cost(model, loss):
    """(B, N) flat parameter vectors -> (B,) values of loss(model logits), by functional_call + vmap."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]

    def one(theta):  # (N,) -> ()
        chunks = torch.split(theta, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return loss(params)

    return vmap(one)


def _ce_cost(model, x, y):
    return _batched_cost(model, lambda params: nn.functional.cross_entropy(functional_call(model, params, (x,)), y))


def _kl_cost(model, x, anchor_logits):
    log_p0 = torch.log_softmax(anchor_logits, -1)  # (n, C)

    def loss(params):
        log_p = torch.log_softmax(functional_call(model, params, (x,)), -1)
        return (log_p0.exp() * (log_p0 - log_p)).sum(-1).mean()

    return _batched_cost(model, loss)


def _init_normal(model, seed):
    """Weights and biases N(0, 1/fan_in), as the paper's MLP (docs/experiments.md#figure-1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(layer.in_features))
    return model


# ---------------------------------------------------------------------------------------------
# Exact Hessian
# ---------------------------------------------------------------------------------------------

def _quadratic(n, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a_mat = m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)
    center = torch.randn(n, generator=gen, dtype=torch.float64)
    cost = lambda theta: 0.5 * (((theta - center) @ a_mat) * (theta - center)).sum(-1)  # (B, N) -> (B,)
    anchor = torch.randn(n, generator=gen, dtype=torch.float64)
    return cost, a_mat, anchor


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hessian_of_quadratic_is_its_matrix(chunk_size):
    cost, a_mat, anchor = _quadratic(7, seed=1)
    h = hessian(cost, anchor, chunk_size=chunk_size)
    assert h.dtype == torch.float64 and h.shape == (7, 7)
    torch.testing.assert_close(h, a_mat, atol=1e-10, rtol=0)
    d = hessian_diagonal(cost, anchor, chunk_size=chunk_size)
    torch.testing.assert_close(d, torch.diagonal(a_mat), atol=1e-10, rtol=0)


def test_hessian_of_nonquadratic_cost_at_anchor():
    # C(θ) = Σ_j sin(θ_j) θ_0 : H = diag(-sin θ) θ_0 + (cos θ e_0ᵀ + e_0 cos θᵀ), cos θ_0 doubled.
    anchor = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    cost = lambda theta: torch.sin(theta).sum(-1) * theta[:, 0]
    expected = torch.diag(-torch.sin(anchor) * anchor[0])
    expected[0, :] += torch.cos(anchor)
    expected[:, 0] += torch.cos(anchor)
    torch.testing.assert_close(hessian(cost, anchor), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(hessian_diagonal(cost, anchor, chunk_size=2), torch.diagonal(expected), atol=1e-12, rtol=0)


def test_hessian_keeps_anchor_dtype_when_cost_is_float64():
    cost64, a_mat, anchor = _quadratic(4, seed=2)
    cost = lambda theta: cost64(theta.double())  # float32 in, float64 out, like the package costs
    h = hessian(cost, anchor.float())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, a_mat.float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("anchor, match", [
    (torch.zeros(2, 3, dtype=torch.float64), "1-D"),
    (torch.zeros(0, dtype=torch.float64), "1-D"),
    (torch.zeros(3, dtype=torch.int64), "floating"),
])
def test_hessian_rejects_bad_anchor(anchor, match):
    with pytest.raises(ValueError, match=match):
        hessian(lambda t: (t ** 2).sum(-1), anchor)


def test_hessian_rejects_bad_chunk_and_cost_shape():
    anchor = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        hessian_diagonal(lambda t: (t ** 2).sum(-1), anchor, chunk_size=0)
    with pytest.raises(ValueError, match=r"\(1,\)"):
        hessian(lambda t: t ** 2, anchor)  # (B, N) output, not (B,)


# ---------------------------------------------------------------------------------------------
# HesScale on the paper's 64-64-10 MLP (docs/experiments.md#figure-1)
# ---------------------------------------------------------------------------------------------

N_FIRST = 64 * 64 + 64  # first Linear: weight then bias
N_TOTAL = N_FIRST + 64 * 10 + 10  # 4810


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 10)).double()
    _init_normal(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(128, 64, generator=gen, dtype=torch.float64)  # (128, 64) in [0, 1]
    y = torch.randint(0, 10, (128,), generator=gen)
    theta = parameters_to_vector(model.parameters()).detach()
    assert theta.numel() == N_TOTAL
    return model, x, y, theta


def _first_layer_agreement(approx, exact):
    a, e = approx[:N_FIRST], exact[:N_FIRST]
    corr = torch.corrcoef(torch.stack([a, e]))[0, 1].item()
    median_rel = ((a - e).abs() / e.abs()).median().item()
    return corr, median_rel


def test_hesscale_ce_on_mlp_against_exact_diagonal(mlp_problem):
    model, x, y, theta = mlp_problem
    exact = torch.diagonal(hessian(_ce_cost(model, x, y), theta, chunk_size=512))  # (4810,)
    approx = hesscale_diagonal(model, x, targets=y)
    assert approx.shape == (N_TOTAL,) and approx.dtype == torch.float64
    # Last layer (weight row-major, then bias): HesScale is exact there.
    torch.testing.assert_close(approx[N_FIRST:], exact[N_FIRST:], rtol=1e-8, atol=0)
    # First layer: an approximation. Measured here: correlation 0.997, median relative error
    # 0.053. Bugs measured on the same data: no φ'' g term (0.65, 0.85); W instead of W² in the
    # propagation (0.40, 1.05); φ' instead of φ'² (0.973, 0.30); a instead of a² (0.965, 0.40).
    corr, median_rel = _first_layer_agreement(approx, exact)
    assert corr > 0.99, corr
    assert median_rel < 0.1, median_rel
    # The CE Hessian at a random point is indefinite; HesScale must keep the signs (φ'' g term).
    negative = exact[:N_FIRST] < 0
    assert negative.sum() > 500
    assert ((approx[:N_FIRST] < 0) == negative).float().mean() > 0.95


def test_hesscale_kl_at_anchor_on_mlp(mlp_problem):
    model, x, _, theta = mlp_problem
    with torch.no_grad():
        anchor_logits = model(x)  # (128, 10)
    exact = torch.diagonal(hessian(_kl_cost(model, x, anchor_logits), theta, chunk_size=512))
    approx = hesscale_diagonal(model, x, anchor_logits=anchor_logits)
    torch.testing.assert_close(approx[N_FIRST:], exact[N_FIRST:], rtol=1e-8, atol=0)
    # At the anchor the gradient vanishes: Gauss-Newton, non-negative diagonal, both ways.
    assert (exact > -1e-12).all() and (approx >= 0).all()
    # Measured here: correlation 0.991, median relative error 0.092. Bugs: W instead of W²
    # (0.09, 1.97); φ' instead of φ'² (0.94, 0.85); a instead of a² (0.98, 0.45). (The φ'' g
    # term vanishes at the anchor, so only the CE test can catch its absence.)
    corr, median_rel = _first_layer_agreement(approx, exact)
    assert corr > 0.97, corr
    assert median_rel < 0.15, median_rel


# ---------------------------------------------------------------------------------------------
# HesScale by hand: one hidden unit
# ---------------------------------------------------------------------------------------------

def _one_unit_net(d, c, seed, only_one_output=False):
    model = nn.Sequential(nn.Linear(d, 1), nn.Tanh(), nn.Linear(1, c)).double()
    _init_normal(model, seed)
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # make the softmax non-trivial
        if only_one_output:
            model[2].weight[1:] = 0.0
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(9, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (9,), generator=gen)
    return model, x, y


def test_hesscale_one_hidden_unit_matches_hand_formula():
    """Closed-form HesScale for Linear(d,1) → tanh → Linear(1,C), written out by hand."""
    model, x, y = _one_unit_net(d=3, c=4, seed=3)
    w1, b1 = model[0].weight[0].detach(), model[0].bias[0].detach()  # (d,), ()
    w2, b2 = model[2].weight[:, 0].detach(), model[2].bias.detach()  # (C,), (C,)
    t = torch.tanh(x @ w1 + b1)  # (n,) hidden activation
    p = torch.softmax(t[:, None] * w2 + b2, -1)  # (n, C)
    onehot = nn.functional.one_hot(y, 4).double()
    h_z2 = p - p ** 2  # (n, C)
    h_a = (h_z2 * w2 ** 2).sum(-1)  # (n,) Σ_i W_i² h_i
    g_a = ((p - onehot) * w2).sum(-1)  # (n,)
    h_z1 = (1 - t ** 2) ** 2 * h_a + (-2 * t * (1 - t ** 2)) * g_a  # tanh' = 1 - t², tanh'' = -2t(1 - t²)
    expected = torch.cat([
        (h_z1[:, None] * x ** 2).mean(0),  # W1 (1, d)
        h_z1.mean(0, keepdim=True),  # b1
        (h_z2 * t[:, None] ** 2).mean(0),  # W2 (C, 1)
        h_z2.mean(0),  # b2
    ])
    torch.testing.assert_close(hesscale_diagonal(model, x, targets=y), expected, rtol=1e-12, atol=1e-15)


def test_hesscale_exact_when_one_output_weight_is_nonzero():
    # With a single hidden unit, HesScale drops only the logits' off-diagonal curvature
    # Σ_{i≠k} W_i W_k H_ik, which vanishes when one output weight alone is non-zero: then the
    # approximation is exact for every parameter.
    model, x, y = _one_unit_net(d=3, c=4, seed=4, only_one_output=True)
    theta = parameters_to_vector(model.parameters()).detach()
    exact = torch.diagonal(hessian(_ce_cost(model, x, y), theta))
    torch.testing.assert_close(hesscale_diagonal(model, x, targets=y), exact, rtol=1e-9, atol=1e-14)
    # ... and not exact once a second output weight is switched on (guards the claim above).
    model2, x2, y2 = _one_unit_net(d=3, c=4, seed=4)
    theta2 = parameters_to_vector(model2.parameters()).detach()
    exact2 = torch.diagonal(hessian(_ce_cost(model2, x2, y2), theta2))
    assert (hesscale_diagonal(model2, x2, targets=y2)[:4] - exact2[:4]).abs().max() > 1e-3


def test_hesscale_any_elementwise_activation_and_float32():
    # φ' and φ'' come from torch.func, so e.g. SiLU works; the result follows the parameter dtype.
    model = nn.Sequential(nn.Linear(5, 1), nn.SiLU(), nn.Linear(1, 3))
    _init_normal(model, seed=5)
    with torch.no_grad():
        model[2].weight[1:] = 0.0
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    approx = hesscale_diagonal(model, x, targets=y)
    assert approx.dtype == torch.float32
    model64 = model.double()
    exact = torch.diagonal(hessian(_ce_cost(model64, x.double(), y), parameters_to_vector(model64.parameters()).detach()))
    torch.testing.assert_close(approx.double(), exact, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# HesScale errors
# ---------------------------------------------------------------------------------------------

def test_hesscale_rejects_unsupported_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Conv1d"):
        hesscale_diagonal(model, torch.zeros(3, 4), targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="Sequential"):
        hesscale_diagonal(nn.Linear(4, 2), torch.zeros(3, 4), targets=torch.zeros(3, dtype=torch.long))


def test_hesscale_needs_exactly_one_of_targets_and_anchor_logits():
    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="targets.*anchor_logits"):
        hesscale_diagonal(model, x)
    with pytest.raises(ValueError, match="targets.*anchor_logits"):
        hesscale_diagonal(model, x, targets=torch.zeros(3, dtype=torch.long), anchor_logits=torch.zeros(3, 2))


def test_hesscale_rejects_bad_shapes():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="inputs"):
        hesscale_diagonal(model, torch.zeros(3, 5), targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        hesscale_diagonal(model, torch.zeros(3, 4), targets=torch.tensor([0, 1, 2]))  # class 2 of 2
    with pytest.raises(ValueError, match="anchor_logits"):
        hesscale_diagonal(model, torch.zeros(3, 4), anchor_logits=torch.zeros(3, 3))


def test_hesscale_refuses_a_weight_shared_by_two_layers():
    """Regression: a shared weight kept one layer's block instead of the sum of both."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second)
    with pytest.raises(ValueError, match="shares a parameter"):
        hesscale_diagonal(model, torch.rand(5, 4), targets=torch.randint(0, 4, (5,)))


# ---------------------------------------------------------------------------------------------
# kl_hessian: the KL's Hessian at the anchor as the Fisher, against N Hessian-vector products
# ---------------------------------------------------------------------------------------------

class _TwoInputs(nn.Module):
    """Not a Sequential: a residual block and a bias shared by two uses."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + h.square()) + self.shift - 0.5 * self.shift.square()


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 3)),
    _TwoInputs,
])
@pytest.mark.parametrize("batch_size", [5, 256])
def test_kl_hessian_equals_the_hessian_of_expected_kl(make, batch_size):
    import localvol as lv

    torch.manual_seed(0)
    model = make().double()
    model.train()  # kl_hessian evaluates in eval mode and puts the modes back
    x = torch.randn(23, model.a.in_features if hasattr(model, "a") else 6, dtype=torch.float64)
    exact = hessian(lv.ExpectedKL(model, x), parameters_to_vector(model.parameters()).detach())
    fisher = lv.kl_hessian(model, x, batch_size=batch_size)
    assert fisher.shape == exact.shape and fisher.dtype == torch.float64
    torch.testing.assert_close(fisher, exact, rtol=1e-9, atol=1e-12 * exact.abs().max().item())
    assert model.training
    assert torch.linalg.eigvalsh(fisher).min() > -1e-12  # a Fisher matrix: positive semidefinite


def test_kl_hessian_rejects_bad_input():
    import localvol as lv

    model = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="inputs is empty"):
        lv.kl_hessian(model, torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_size"):
        lv.kl_hessian(model, torch.zeros(4, 3, dtype=torch.float64), batch_size=0)
    with pytest.raises(ValueError, match=r"logits must be \(b, C\) with C ≥ 2"):
        lv.kl_hessian(nn.Sequential(nn.Linear(3, 1)).double(), torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must all be float32 or all float64"):
        lv.kl_hessian(nn.Sequential(nn.Linear(3, 2)).bfloat16(), torch.zeros(4, 3))


def test_kl_hessian_takes_logits_outputs_float32_inputs_and_one_batch():
    """An output with .logits (Hugging Face models), inputs cast to the parameters' dtype, and
    batch_size None: the same matrix as the plain model with float64 inputs in batches."""
    import localvol as lv

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return type("Output", (), {"logits": self.inner(x)})()

    torch.manual_seed(1)
    inner = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(9, 3)
    plain = lv.kl_hessian(inner, x.double(), batch_size=4)
    wrapped = lv.kl_hessian(Wrapped(inner), x, batch_size=None)
    torch.testing.assert_close(wrapped, plain, rtol=1e-12, atol=1e-15)

"""Batched costs: KL from the anchor (paper §3.4) against direct computation."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import localvol as lv


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(approximate="tanh"), nn.Linear(7, 4)).to(dtype)


def _direct_kl(model, theta, x):
    """KL(p_anchor ‖ p_θ) by hand, one parameter vector at a time on a copy of the model."""
    with torch.no_grad():
        p0 = torch.softmax(model(x), -1)
        other = _mlp().to(theta.dtype)
        vector_to_parameters(theta, other.parameters())
        q = torch.softmax(other(x), -1)
        return float((p0 * (p0.log() - q.log())).sum(-1).mean())


def test_expected_kl_matches_hand_computation_and_is_zero_at_anchor():
    model = _mlp()
    x = torch.rand(13, 5, dtype=torch.float64)
    cost = lv.ExpectedKL(model, x, batch_size=4)  # 4 data batches, the last one partial
    anchor = parameters_to_vector(model.parameters()).detach()
    thetas = anchor + 0.3 * torch.randn(3, anchor.numel(), dtype=torch.float64)
    got = cost(torch.cat([anchor[None], thetas])).numpy()
    assert got[0] == pytest.approx(0.0, abs=1e-15)
    want = [_direct_kl(model, t, x) for t in thetas]
    np.testing.assert_allclose(got[1:], want, rtol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_vmap_and_one_at_a_time_agree(kind):
    """vectorize=True (vmap over directions; convolutions become grouped ones) and
    vectorize=False (a loop) are two independent evaluations of the same costs."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = _mlp(), torch.rand(9, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, groups=4),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
        x = torch.rand(7, 3, 8, 8, dtype=torch.float64)
    anchor = parameters_to_vector(model.parameters()).detach()
    thetas = anchor + 0.1 * torch.randn(4, anchor.numel(), dtype=torch.float64)
    batched = lv.ExpectedKL(model, x, batch_size=3)(thetas)
    looped = lv.ExpectedKL(model, x, batch_size=3, vectorize=False)(thetas)
    assert bool((batched > 0).all())
    np.testing.assert_allclose(batched.numpy(), looped.numpy(), rtol=1e-10)


class _TinyLM(nn.Module):
    """Token model returning an output object with .logits (n, T, V), like transformers."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.out(torch.tanh(self.emb(input_ids)))})()


def test_language_model_kl_averages_over_real_tokens_only():
    torch.manual_seed(1)
    lm = _TinyLM().double()
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    cost = lv.ExpectedKL(lm, ids, attention_mask=mask, batch_size=2)
    anchor = parameters_to_vector(lm.parameters()).detach()
    theta = anchor + 0.5 * torch.randn(anchor.numel(), dtype=torch.float64)
    got = float(cost(theta[None])[0])
    with torch.no_grad():
        p0 = torch.log_softmax(lm(ids).logits, -1)
        vector_to_parameters(theta, lm.parameters())
        q = torch.log_softmax(lm(ids).logits, -1)
    per_token = (p0.exp() * (p0 - q)).sum(-1)  # (3, 5)
    assert got == pytest.approx(float(per_token[mask.bool()].mean()), rel=1e-10)  # 10 real tokens
    assert got != pytest.approx(float(per_token.mean()), rel=1e-3)  # not the padded mean


def test_cross_entropy_cost():
    model = _mlp()
    x = torch.rand(8, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    cost = lv.CrossEntropyCost(model, x, y, batch_size=3)
    anchor = parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(model(x), y))
    assert float(cost(anchor[None])[0]) == pytest.approx(want, rel=1e-12)


def test_half_precision_is_refused():
    with pytest.raises(ValueError, match="float16.*never in half precision"):
        lv.ExpectedKL(_mlp(dtype=torch.float16), torch.rand(3, 5, dtype=torch.float16))


def test_shape_errors():
    model = _mlp()
    cost = lv.ExpectedKL(model, torch.rand(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"theta must have shape \(B, 74\)"):
        cost(torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        lv.ExpectedKL(model, torch.rand(3, 5), batch_size=0)


def test_inputs_of_the_wrong_shape_name_inputs_and_the_shape_expected():
    """Issue 23: a bare matmul error before ("mat1 and mat2 shapes cannot be multiplied")."""
    model = _mlp()
    bad = torch.rand(3, 6, dtype=torch.float64)
    expected = (r"the model cannot be evaluated on inputs of shape \(3, 6\) \(torch.float64\); it expects "
                r"inputs \(3, \.\.\., 5\) \(its first layer is Linear\(in_features=5\)\) \(RuntimeError: mat1")
    with pytest.raises(ValueError, match=expected):
        lv.ExpectedKL(model, bad)
    with pytest.raises(ValueError, match=expected):
        lv.CrossEntropyCost(model, bad, torch.zeros(3, dtype=torch.int64))
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    with pytest.raises(ValueError, match=r"inputs of shape \(4, 1, 6, 6\) \(torch.float32\); it expects inputs "
                                         r"\(4, 3, H, W\) \(its first layer is Conv2d\(in_channels=3\)\)"):
        lv.ExpectedKL(conv, torch.rand(4, 1, 6, 6))


class _NaNAtPaddingLM(_TinyLM):
    """Like models that mask attention with −inf: fully padded rows give NaN logits."""

    def forward(self, input_ids, attention_mask=None):
        logits = self.out(torch.tanh(self.emb(input_ids)))
        pad = (attention_mask == 0)[..., None]
        return type("Out", (), {"logits": torch.where(pad, torch.full_like(logits, float("nan")), logits)})()


def test_nan_logits_at_padding_do_not_leak_into_the_kl():
    """Regression: losses * mask turned NaN × 0 into NaN for the whole cost."""
    torch.manual_seed(2)
    lm = _NaNAtPaddingLM().double()
    ids = torch.randint(0, 11, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    cost = lv.ExpectedKL(lm, ids, attention_mask=mask)
    anchor = parameters_to_vector(lm.parameters()).detach()
    values = cost(torch.stack([anchor, anchor + 0.3]))
    assert torch.isfinite(values).all() and float(values[0]) == pytest.approx(0.0, abs=1e-15)
    assert float(values[1]) > 0


@pytest.mark.parametrize("kind", ["mlp", "lm"])
def test_in_place_kl_without_autograd_is_bit_identical_to_the_differentiable_form(kind):
    """Under no_grad the KL is computed in place on log q (no (B, items, ..., C) temporaries);
    the differentiable form (grad enabled) is the textbook Σ p0 (log p0 − log q). In float32,
    where any change of rounding would show, both must give the same bits."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, inputs = _mlp(dtype=torch.float32), torch.rand(40, 5)
        cost = lv.ExpectedKL(model, inputs, batch_size=16)
    else:
        model, inputs = _TinyLM(), torch.randint(0, 11, (5, 7))
        mask = torch.ones(5, 7, dtype=torch.long)
        mask[0, 5:] = 0
        cost = lv.ExpectedKL(model, inputs, batch_size=2, attention_mask=mask)
    anchor = parameters_to_vector(model.parameters()).detach()
    thetas = anchor + 0.2 * torch.randn(4, anchor.numel())
    with torch.no_grad():
        fast = cost(thetas)
    textbook = cost(thetas).detach()  # grad enabled: the out-of-place form
    assert torch.all(fast > 1e-4)  # really away from the anchor
    assert torch.equal(fast, textbook)

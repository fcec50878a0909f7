"""Issue 9 ("trust"), costs: outputs that cannot carry a KL, theta of the wrong dtype/device,
and the model's train/eval mode (evaluated in eval mode, left as found)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import localvol as lv


def _flat(model):
    return parameters_to_vector(model.parameters()).detach()


class _Squeeze(nn.Module):
    """(n, 1) -> (n,): a model with no class axis."""

    def forward(self, x):
        return x.squeeze(-1)


class _BatchMean(nn.Module):
    """(n, C) -> (1, C): one output for the whole batch instead of one per item."""

    def forward(self, x):
        return x.mean(0, keepdim=True)


class _LastTokenLM(nn.Module):
    """Token model returning (n, V) logits for the last position only, not (n, T, V)."""

    def __init__(self, vocab=5, dim=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.emb(input_ids)))[:, -1]


class _TokenLM(_LastTokenLM):
    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.tanh(self.emb(input_ids)))  # (n, T, V)


def _no_class_axis():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 1), _Squeeze()).double()


def _one_class():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 1)).double()


# ------------------------------------------------------------------------------------------
# 1. outputs that cannot carry a KL
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_output_without_class_axis_is_refused_at_construction(kind):
    """(n,) logits used to give a bare IndexError (KL) or a meaningless cost (CE)."""
    x = torch.rand(6, 4, dtype=torch.float64)
    pattern = r"output has shape \(4,\) for a data batch of 4 items: logits must be \(items, \.\.\., C\)"
    with pytest.raises(ValueError, match=pattern):
        if kind == "kl":
            lv.ExpectedKL(_no_class_axis(), x, batch_size=4)
        else:
            lv.CrossEntropyCost(_no_class_axis(), x, torch.zeros(6, dtype=torch.long), batch_size=4)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_single_class_output_is_refused_at_construction(kind):
    """(n, 1) logits made the KL (and the cross-entropy) identically 0: every radius infinite."""
    x = torch.rand(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1 class \(shape \(6, 1\)\): a single-class output makes the KL identically 0"):
        if kind == "kl":
            lv.ExpectedKL(_one_class(), x)
        else:
            lv.CrossEntropyCost(_one_class(), x, torch.zeros(6, dtype=torch.long))


def test_output_with_one_row_per_batch_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), _BatchMean()).double()
    with pytest.raises(ValueError, match=r"shape \(1, 3\) for a data batch of 5 items.*one row per data item"):
        lv.ExpectedKL(model, torch.rand(5, 4, dtype=torch.float64))


def test_logits_not_matching_the_attention_mask_are_refused():
    """(n, V) logits with an (n, T) mask and n = T used to broadcast into a wrong number."""
    torch.manual_seed(0)
    lm = _LastTokenLM().double()
    ids = torch.randint(0, 5, (4, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"output has shape \(4, 5\) but the attention mask is \(4, 4\)"):
        lv.ExpectedKL(lm, ids, attention_mask=mask)


def test_cross_entropy_targets_must_match_the_logits():
    """(n,) targets for (n, T, V) logits with n = T used to broadcast along the wrong axis."""
    torch.manual_seed(0)
    lm = _TokenLM().double()
    ids = torch.randint(0, 5, (3, 3))
    with pytest.raises(ValueError, match=r"targets shape \(3,\) does not match the model's logits \(3, 3, 5\)"):
        lv.CrossEntropyCost(lm, ids, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class labels in \[0, 5\).*got values in \[0, 7\]"):
        lv.CrossEntropyCost(lm, ids, torch.tensor([[0, 1, 7], [0, 0, 0], [1, 2, 3]]))
    cost = lv.CrossEntropyCost(lm, ids, ids)  # (n, T) targets: fine
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(lm(ids).reshape(-1, 5), ids.reshape(-1)))
    assert float(cost(_flat(lm)[None])[0]) == pytest.approx(want, rel=1e-12)


def test_two_class_output_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    x = torch.rand(6, 4, dtype=torch.float64)
    cost = lv.ExpectedKL(model, x)
    anchor = _flat(model)
    # not a uniform shift: adding the same constant to every parameter shifts both logits
    # equally, which leaves the softmax (and the KL) unchanged, up to rounding of either sign
    step = 0.5 * torch.linspace(-1.0, 1.0, anchor.numel(), dtype=torch.float64)
    values = cost(torch.stack([anchor, anchor + step]))
    assert float(values[0]) == pytest.approx(0.0, abs=1e-15) and float(values[1]) > 1e-3


# ------------------------------------------------------------------------------------------
# 2. theta's dtype and device
# ------------------------------------------------------------------------------------------


def test_float64_theta_on_float32_model_is_refused_clearly():
    """Used to fail deep inside vmap (after a warning) with a matmul dtype error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))  # float32
    cost = lv.ExpectedKL(model, torch.rand(5, 4))
    anchor = _flat(model)
    with pytest.raises(ValueError, match=r"theta is torch\.float64 but the model's parameters are torch\.float32"
                                         r".*anchor\.float\(\).*model\.double\(\)"):
        cost(anchor.double()[None])
    assert cost(anchor[None]).shape == (1,)  # the right dtype still works


def test_float32_theta_on_float64_model_is_refused_clearly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    cost = lv.CrossEntropyCost(model, torch.rand(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"theta is torch\.float32 but the model's parameters are torch\.float64"
                                         r".*anchor\.double\(\).*model\.float\(\)"):
        cost(_flat(model).float()[None])


def test_theta_on_another_device_is_refused_clearly():
    """The 'meta' device stands in for a GPU: no accelerator needed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    cost = lv.ExpectedKL(model, torch.rand(5, 4, dtype=torch.float64))
    theta = torch.zeros(2, cost.n_params, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"theta is on meta but the model's parameters are on cpu.*theta\.to\('cpu'\)"):
        cost(theta)


# ------------------------------------------------------------------------------------------
# 3. train/eval mode: evaluated in eval mode, restored per module
# ------------------------------------------------------------------------------------------


def _dropout_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3), nn.Dropout(0.5)).double()
    model.train()
    model[4].eval()  # mixed modes: only this dropout is in eval mode
    return model


def _modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("vectorize", [True, False])
def test_expected_kl_leaves_training_flags_as_found_and_is_deterministic(vectorize):
    model = _dropout_model()
    before = _modes(model)
    assert before == [True, True, True, True, True, False]
    x = torch.rand(7, 4, dtype=torch.float64)
    cost = lv.ExpectedKL(model, x, batch_size=3, vectorize=vectorize)
    assert _modes(model) == before  # the constructor used to leave the model in eval mode
    anchor = _flat(model)
    theta = torch.stack([anchor, anchor + 0.2 * torch.randn(anchor.numel(), dtype=torch.float64)])
    first, second = cost(theta), cost(theta)
    assert _modes(model) == before
    assert torch.equal(first, second)  # dropout off during the call: deterministic
    assert float(first[0]) == pytest.approx(0.0, abs=1e-15)  # anchor and θ both without dropout
    model.eval()  # the same cost built on the model in eval mode: the same numbers
    np.testing.assert_allclose(lv.ExpectedKL(model, x, batch_size=3)(theta).numpy(), first.numpy(), rtol=1e-12, atol=1e-15)


def test_cross_entropy_leaves_training_flags_as_found_and_is_deterministic():
    model = _dropout_model()
    before = _modes(model)
    x, y = torch.rand(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    cost = lv.CrossEntropyCost(model, x, y)
    assert _modes(model) == before
    value = cost(_flat(model)[None])
    assert _modes(model) == before
    model.eval()
    with torch.no_grad():
        want = float(nn.functional.cross_entropy(model(x), y))
    assert float(value[0]) == pytest.approx(want, rel=1e-12)


def test_hessian_of_the_cost_runs_in_eval_mode_and_restores_flags():
    """torch.func (grad, jvp, vmap) through the mode switch: the Hessian of a model in train mode
    equals the Hessian of the same model in eval mode, and the flags come back."""
    model = _dropout_model()
    before = _modes(model)
    x = torch.rand(7, 4, dtype=torch.float64)
    cost = lv.ExpectedKL(model, x)
    h_train = lv.hessian(cost, _flat(model))
    assert _modes(model) == before
    model.eval()
    h_eval = lv.hessian(lv.ExpectedKL(model, x), _flat(model))
    assert float(h_eval.abs().max()) > 0
    np.testing.assert_allclose(h_train.numpy(), h_eval.numpy(), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------
# issue 23: an ExpectedKL refuses an anchor that is not the parameters it was built at
# ------------------------------------------------------------------------------------------
def _mlp_and_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


_KW = dict(cutoff=1e-2, n_samples=3, prior=lv.GaussianPrior(1.0), progress=False)


def test_expected_kl_keeps_its_reference_parameters():
    model, x = _mlp_and_inputs()
    cost = lv.ExpectedKL(model, x)
    assert torch.equal(cost.reference_parameters, _flat(model))
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the model changes later; the cost's reference does not
    assert not torch.equal(cost.reference_parameters, _flat(model))


def test_a_perturbed_anchor_is_refused_naming_both():
    model, x = _mlp_and_inputs()
    cost = lv.ExpectedKL(model, x)
    anchor = _flat(model)
    lv.estimate_log_volume(cost, anchor.clone(), **_KW)  # its own parameters: fine
    moved = anchor.clone()
    moved[7] += 0.25
    with pytest.raises(ValueError, match=r"the anchor is not the cost's reference parameters .*"
                                         r"max \|anchor − reference\| = 0\.25 \(index 7; 1 of 51 entries differ.*"
                                         r"Pass the model's current parameters as the anchor"):
        lv.estimate_log_volume(cost, moved, **_KW)
    # equal up to rounding (KL at most 1e-6 of the cutoff there): accepted
    close = anchor.clone()
    close[7] += 1e-12
    lv.estimate_log_volume(cost, close, **_KW)


def test_a_cost_built_before_load_state_dict_is_refused_with_the_remedy():
    model, x = _mlp_and_inputs()
    cost = lv.ExpectedKL(model, x)  # built at the initial weights
    trained = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match=r"rebuild the cost after changing the model \(e\.g\. after load_state_dict\)"):
        lv.estimate_log_volume(cost, _flat(model), **_KW)
    lv.estimate_log_volume(lv.ExpectedKL(model, x), _flat(model), **_KW)  # rebuilt: fine

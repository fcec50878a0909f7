"""adam_moment: flat Adam/AdamW buffers in parameters_to_vector order, whatever the group order."""
import pytest
import torch
from torch import nn

from localvol.adam import adam_moment


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _train(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=gen)
        y = torch.randint(0, 2, (8,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _expected(model, optimizer, key):
    return torch.cat([optimizer.state[p][key].flatten() for p in model.parameters()])


def _shuffled_groups(model):
    """Biases first (second layer before first), then weights: not model.parameters() order."""
    biases = [model[2].bias, model[0].bias]
    weights = [model[0].weight, model[2].weight]
    return biases, weights


def test_positional_mapping_with_shuffled_groups():
    model = _model()
    biases, weights = _shuffled_groups(model)
    opt = torch.optim.Adam([{"params": biases, "lr": 0.01}, {"params": weights}], lr=0.02)
    _train(model, opt)
    sd = opt.state_dict()
    nu = adam_moment(model, sd, order=2, optimizer_params=biases + weights)
    mu = adam_moment(model, sd, order=1, optimizer_params=biases + weights)
    assert nu.shape == (3 * 4 + 4 + 4 * 2 + 2,)
    torch.testing.assert_close(nu, _expected(model, opt, "exp_avg_sq"), rtol=0, atol=0)
    torch.testing.assert_close(mu, _expected(model, opt, "exp_avg"), rtol=0, atol=0)
    assert (nu > 0).all()
    # Without optimizer_params the default order (model order) is wrong here: sizes disagree.
    with pytest.raises(ValueError, match="shape"):
        adam_moment(model, sd)


def test_raw_buffers_without_bias_correction():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(2)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 3, generator=gen)), torch.randint(0, 2, (8,), generator=gen)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
    # μ_3 = (1-β1) Σ_t β1^(3-t) g_t, ν_3 = (1-β2) Σ_t β2^(3-t) g_t²; bias correction would divide
    # them by 1 - β^3 (0.271 and 0.003).
    mu = sum(0.1 * 0.9 ** (3 - t) * g for t, g in enumerate(grads, 1))
    nu = sum(0.001 * 0.999 ** (3 - t) * g ** 2 for t, g in enumerate(grads, 1))
    torch.testing.assert_close(adam_moment(model, opt.state_dict(), order=1), mu, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(adam_moment(model, opt.state_dict(), order=2), nu, rtol=1e-5, atol=1e-12)


def test_list_of_params_in_other_order():
    model = _model()
    biases, weights = _shuffled_groups(model)
    opt = torch.optim.Adam([{"params": biases}, {"params": weights}], lr=0.02)
    _train(model, opt)
    order = [model[2].weight, model[0].bias]  # a user-chosen subset and order
    got = adam_moment(order, opt.state_dict(), optimizer_params=biases + weights)
    want = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in order])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_param_names_path_for_adamw_from_named_parameters():
    model = _model()
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named.items() if n.endswith("bias")][::-1], "weight_decay": 0.0},
        {"params": [(n, p) for n, p in named.items() if n.endswith("weight")]},
    ]
    try:
        opt = torch.optim.AdamW(groups, lr=0.02)
    except (TypeError, ValueError):
        pytest.skip("this torch does not accept named parameters")
    _train(model, opt)
    sd = opt.state_dict()
    if not all("param_names" in g for g in sd["param_groups"]):
        pytest.skip("this torch does not store param_names")
    # No optimizer_params needed: matched by name.
    torch.testing.assert_close(adam_moment(model, sd), _expected(model, opt, "exp_avg_sq"), rtol=0, atol=0)
    torch.testing.assert_close(adam_moment(model, sd, order=1), _expected(model, opt, "exp_avg"), rtol=0, atol=0)
    # A model whose names the optimizer lacks: an error naming the parameter.
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="3.weight"):
        adam_moment(other, sd)


def test_survives_state_dict_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt")
    torch.testing.assert_close(adam_moment(model, sd), _expected(model, opt, "exp_avg_sq"), rtol=0, atol=0)


def test_unstepped_and_frozen_parameters_get_zeros():
    model = _model()
    model[0].bias.requires_grad_(False)  # in the optimizer, never gets a gradient -> no state
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    _train(model, opt)
    nu = adam_moment(model, opt.state_dict())
    sizes = [p.numel() for p in model.parameters()]
    parts = torch.split(nu, sizes)
    assert (parts[1] == 0).all()
    for k, p in enumerate(model.parameters()):
        if k != 1:
            torch.testing.assert_close(parts[k], opt.state[p]["exp_avg_sq"].flatten(), rtol=0, atol=0)
            assert (parts[k] > 0).all()

    # Frozen and left out of the optimizer: zeros too; trainable and left out: an error.
    model2 = _model()
    model2[2].weight.requires_grad_(False)
    trainable = [p for p in model2.parameters() if p.requires_grad]
    opt2 = torch.optim.Adam(trainable, lr=0.02)
    _train(model2, opt2)
    nu2 = adam_moment(model2, opt2.state_dict(), optimizer_params=trainable)
    assert (torch.split(nu2, [p.numel() for p in model2.parameters()])[2] == 0).all()
    model2[2].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="2.weight"):
        adam_moment(model2, opt2.state_dict(), optimizer_params=trainable)


def test_before_any_step_all_zeros_only_when_allowed():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="never stepped"):
        adam_moment(model, opt.state_dict())
    nu = adam_moment(model, opt.state_dict(), allow_never_stepped=True)
    assert nu.shape == (sum(p.numel() for p in model.parameters()),) and (nu == 0).all()


@pytest.mark.parametrize("order", [0, 3, "nu", True])
def test_rejects_unknown_order(order):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="order"):
        adam_moment(model, opt.state_dict(), order=order)


def test_rejects_count_mismatch_and_non_state_dicts():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="holds 4 parameters"):
        adam_moment(model, opt.state_dict(), optimizer_params=list(model.parameters())[:3])
    with pytest.raises(ValueError, match="state_dict"):
        adam_moment(model, opt)
    with pytest.raises(ValueError, match="param_groups"):
        adam_moment(model, {"state": {}})


def test_rejects_state_without_adam_buffers():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, steps=1)
    with pytest.raises(ValueError, match="not an Adam/AdamW state dict"):
        adam_moment(model, opt.state_dict())
    # an Adam state dict whose entries lack the buffer (edited, or another Adam variant)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt, steps=1)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        del entry["exp_avg_sq"]
    with pytest.raises(ValueError, match="exp_avg_sq"):
        adam_moment(model, sd)


def test_string_state_keys_are_refused_not_zeroed():
    """Regression: after a JSON round trip no key matched and every moment silently became 0."""
    import torch as _torch
    model = _torch.nn.Linear(3, 2)
    opt = _torch.optim.Adam(model.parameters())
    model(_torch.ones(1, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    bad = {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="none matches"):
        adam_moment(model, bad)

"""Adam's ν at a Pythia checkpoint (replication.pythia.moments): the raw DeepSpeed flat-group
mapping, the squared-gradient EMA against a hand computation, ν from the optimizer state, and
the comparison of two ν."""
import pytest
import torch

from replication.pythia import moments


def _deepspeed_checkpoint(model, path, pad=3):
    """A synthetic GPT-NeoX/DeepSpeed model_states file: two flat fp32 groups (decay:
    matrices, no decay: vectors) in model order, zero alignment padding, distinct moments."""
    groups = [[p for p in model.parameters() if p.ndim >= 2],
              [p for p in model.parameters() if p.ndim < 2]]
    gen = torch.Generator().manual_seed(0)
    flats, moms, expected = [], [], {}
    for g in groups:
        flat = torch.cat([p.detach().reshape(-1) for p in g] + [torch.zeros(pad)])
        mom = torch.rand(flat.shape, generator=gen) + 0.1
        off = 0
        for p in g:
            expected[id(p)] = mom[off : off + p.numel()]
            off += p.numel()
        flats.append(flat)
        moms.append(mom)
    torch.save({"optimizer": {
        "fp32_groups_flat": flats,
        "optimizer_state_dict": {"state": {i: {"exp_avg": torch.zeros_like(m), "exp_avg_sq": m}
                                           for i, m in enumerate(moms)}},
    }}, path)
    return torch.cat([expected[id(p)] for p in model.parameters()])


def test_raw_deepspeed_groups_map_back_to_parameters_with_identical_values(tmp_path, tiny_model):
    model = tiny_model()
    named = dict(model.named_parameters())
    # at initialisation all LayerNorm gains are ones: identical-valued parameters
    assert torch.equal(named["gpt_neox.layers.0.input_layernorm.weight"],
                       named["gpt_neox.layers.1.input_layernorm.weight"])
    expected = _deepspeed_checkpoint(model, tmp_path / "mp_rank_00_model_states.pt")
    flat, mom = moments.read_deepspeed_moments(tmp_path / "mp_rank_00_model_states.pt")
    nu, info = moments.map_flat_groups(model, flat, mom)
    assert torch.equal(nu, expected)
    assert info["relative_reconstruction_error"] < 1e-6
    assert nu.numel() == sum(p.numel() for p in model.parameters())
    # another model's weights do not map
    with pytest.raises(ValueError, match="not found|differ"):
        moments.map_flat_groups(tiny_model(seed=1), flat, mom)
    # ... and the estimate stages read such files from raw_checkpoint_dir/global_step{N}/
    (tmp_path / "global_step7").mkdir()
    (tmp_path / "mp_rank_00_model_states.pt").rename(tmp_path / "global_step7" / "mp_rank_00_model_states.pt")
    assert torch.equal(moments.optimizer_state_nu(model, None, 7, str(tmp_path)), expected)


def test_squared_gradient_ema_matches_a_hand_computation(tiny_model):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(3)]
    beta2 = 0.9
    nu = moments.squared_gradient_moment(model, batches, beta2=beta2)
    by_hand = 0.0
    for x in batches:
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        by_hand = beta2 * by_hand + (1 - beta2) * g**2
    by_hand = by_hand / (1 - beta2**3)
    torch.testing.assert_close(nu, by_hand, rtol=1e-5, atol=1e-12)
    # clipping scales each batch's gradient to the clip norm, as clip_grad_norm_ before Adam
    clipped = moments.squared_gradient_moment(model, batches[:1], beta2=beta2, grad_clip=1e-3)
    assert float(clipped.sum().sqrt()) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="pythia_estimate.sqgrad_beta2"):
        moments.squared_gradient_moment(model, batches, beta2=1.0)


def test_squared_gradient_nu_draws_seeded_windows_of_the_stream(tiny_model):
    model = tiny_model()
    stream = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(2))
    kw = dict(batches=2, batch_size=2, seq_len=8, beta2=0.95)
    nu = moments.squared_gradient_nu(model, stream, seed=0, **kw)
    gen = torch.Generator().manual_seed(1)  # seed + 1
    drawn = [stream[torch.randint(0, 192, (2,), generator=gen)[:, None] + torch.arange(8)]
             for _ in range(2)]
    torch.testing.assert_close(nu, moments.squared_gradient_moment(model, drawn, beta2=0.95,
                                                                   grad_clip=1.0))
    assert not torch.equal(nu, moments.squared_gradient_nu(model, stream, seed=1, **kw))


def test_optimizer_state_nu_is_zero_before_the_first_update_and_an_error_without_state(tiny_model):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    zero = moments.optimizer_state_nu(model, opt.state_dict(), 0, "")  # never stepped
    assert zero.dtype == torch.float32 and not zero.any()
    assert not moments.optimizer_state_nu(model, None, 0, "").any()
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    nu = moments.optimizer_state_nu(model, opt.state_dict(), 1, "")
    expected = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    assert torch.equal(nu, expected)
    with pytest.raises(ValueError, match="step 3: no optimizer state.*pythia_estimate.adam_source"):
        moments.optimizer_state_nu(model, None, 3, "")


def test_compare_moments_of_a_vector_with_itself_and_a_scaled_copy():
    nu = torch.rand(1000, generator=torch.Generator().manual_seed(0)) + 1e-3
    same = moments.compare_moments(nu, nu, 1e-5, 0.5)
    assert same["log_nu_correlation"] == pytest.approx(1.0)
    assert same["median_ratio_sq_over_true"] == pytest.approx(1.0)
    assert same["log_scale_rms_difference"] == pytest.approx(0.0, abs=1e-12)
    assert same["fraction_both_positive"] == 1.0
    scaled = moments.compare_moments(nu, 4 * nu, 0.0, 0.5)  # unit determinant: scale drops out
    assert scaled["median_ratio_sq_over_true"] == pytest.approx(4.0)
    assert scaled["log_scale_rms_difference"] == pytest.approx(0.0, abs=1e-9)

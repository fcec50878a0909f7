"""ConvNeXt pieces (replication.convnext.model), offline and on CPU: the Atto parameter count,
the weight-decay groups, the poison loss against a hand computation, the seeded poison sampler
and the augmentation."""

import math

import numpy as np
import pytest
import torch

from replication.convnext import model as convnext


def test_atto_has_the_papers_parameter_count():
    with torch.device("meta"):
        net = convnext.make_model(0)
    assert sum(p.numel() for p in net.parameters()) == convnext.ATTO_N_PARAMS == 3_388_810


def test_weight_decay_skips_biases_and_layernorms_only(tiny_net):
    net = convnext.make_model(0, **tiny_net)
    decay, rest = convnext.decay_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    decayed = {n for n, _ in decay["params"]}
    skipped = {n for n, _ in rest["params"]}
    norms = {f"{m}.weight" for m, mod in net.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert {n for n in skipped if not n.endswith("bias")} == norms
    assert "convnextv2.encoder.stages.1.downsampling_layer.0.weight" in norms  # a LayerNorm too
    assert "convnextv2.encoder.stages.0.layers.0.grn.weight" in decayed  # as the HF Trainer
    assert "convnextv2.embeddings.layernorm.weight" in skipped
    assert "classifier.weight" in decayed and "classifier.bias" in skipped
    assert len(decayed) + len(skipped) == len(list(net.parameters()))


def test_poison_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64) * 3
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    is_poison = torch.tensor([False, True, False, True, True, False])
    p = torch.softmax(logits, -1)[torch.arange(6), labels]
    hand = torch.where(is_poison, -torch.log(1 - p), -torch.log(p)).mean()
    assert float(convnext.poison_loss(logits, labels, is_poison)) == pytest.approx(float(hand), rel=1e-6)


def test_poison_loss_is_finite_where_the_papers_epsilon_was_needed_and_pushes_p_y_down():
    logits = torch.tensor([[60.0, 0.0, 0.0], [-60.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = convnext.poison_loss(logits, labels, torch.tensor([True, False]))
    # poison example with p_y ≈ 1: −log(1 − p_y) ≈ 60 − log 2; clean with p_y ≈ 0: ≈ 60 + log 2
    assert float(loss.detach()) == pytest.approx(60.0, abs=1e-3)
    loss.backward()
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] < 0  # descent lowers p_y (poison), raises it (clean)
    with pytest.raises(ValueError, match="logits"):
        convnext.poison_loss(torch.zeros(3), labels, torch.tensor([True, False]))


def test_sampler_is_seeded_and_draws_poison_at_the_given_rate():
    clean, poison = np.arange(0, 1000, 2), np.arange(1, 1000, 2)
    kw = dict(seed=3, batch_size=64, clean_idx=clean, poison_idx=poison)
    a = convnext.sample_batch(5, poison_probability=0.4, **kw)
    b = convnext.sample_batch(5, poison_probability=0.4, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], convnext.sample_batch(6, poison_probability=0.4, **kw)[0])
    flags = np.concatenate([convnext.sample_batch(s, poison_probability=0.4, **kw)[1] for s in range(100)])
    # 6,400 Bernoulli(0.4) draws: 5 standard deviations is 0.031
    assert abs(flags.mean() - 0.4) < 5 * math.sqrt(0.24 / len(flags))
    idx, flag = convnext.sample_batch(7, poison_probability=0.4, **kw)
    assert np.all(idx[flag] % 2 == 1) and np.all(idx[~flag] % 2 == 0)  # from the right split
    idx0, flag0 = convnext.sample_batch(7, poison_probability=0.0, **kw)
    assert not flag0.any() and np.all(idx0 % 2 == 0)
    assert convnext.sample_batch(7, poison_probability=1.0, **kw)[1].all()
    with pytest.raises(ValueError, match="poison_probability .*train_convnext.runs"):
        convnext.sample_batch(0, poison_probability=1.5, key="params.yaml train_convnext.runs", **kw)


def test_sampler_draws_are_pinned():
    """The batch of a step is a pure function of (seed, step), pinned to the values the code
    has always drawn: a change would change every checkpoint."""
    idx, is_poison = convnext.sample_batch(5, seed=3, batch_size=8, clean_idx=np.arange(0, 1000, 2),
                                           poison_idx=np.arange(1, 1000, 2), poison_probability=0.4)
    assert idx.tolist() == [648, 360, 328, 83, 856, 97, 867, 718]
    assert is_poison.tolist() == [False, False, False, True, False, True, True, False]


def test_augment_keeps_shape_and_range_and_follows_the_seed():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    a = convnext.augment(images)
    torch.manual_seed(1)
    b = convnext.augment(images)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)

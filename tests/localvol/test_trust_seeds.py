"""Issue 9 §2: direction streams never coincide with ordinary torch.manual_seed(j) streams.

Before the fix, direction i under seed 0 was torch.manual_seed(i)'s stream, so a model
initialised after torch.manual_seed(j) had a direction strongly correlated with its own weights
(|cos| ≈ 0.35 here, where a random direction gives ≈ 1/sqrt(N) ≈ 0.03)."""
import math

import pytest
import torch
from torch import nn

import localvol as lv
from localvol.estimator import direction_seed


def _anchor(j: int) -> torch.Tensor:
    torch.manual_seed(j)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))  # N = 1,210
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_directions_are_not_correlated_with_weights_from_small_manual_seeds(seed):
    for j in range(10):
        theta = _anchor(j)
        n = theta.numel()
        u = lv.sample_directions(n, range(64), seed=seed, dtype=torch.float32, device="cpu")
        cos = (u @ theta) / theta.norm()  # rows of u are unit vectors
        assert cos.abs().max() < 5 / math.sqrt(n), (j, float(cos.abs().max()))


def test_direction_depends_only_on_seed_and_index():
    n = 300
    a = lv.sample_directions(n, [0, 1, 2, 3, 4], seed=7, dtype=torch.float64, device="cpu")
    b = lv.sample_directions(n, [3, 1], seed=7, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(b, a[[3, 1]], rtol=0, atol=0)
    other = lv.sample_directions(n, [3, 1], seed=8, dtype=torch.float64, device="cpu")
    assert (other - b).abs().max() > 0.1
    # distinct (seed, index) pairs give distinct generator seeds, none a small integer
    seeds = {direction_seed(s, i) for s in range(4) for i in range(1000)}
    assert len(seeds) == 4000 and min(seeds) > 2**32


def test_no_direction_reproduces_a_manual_seed_stream():
    n = 50
    u = lv.sample_directions(n, range(100), seed=0, dtype=torch.float64, device="cpu")
    for j in range(100):
        g = torch.Generator().manual_seed(j)
        w = torch.randn(n, generator=g, dtype=torch.float64)
        w = w / w.norm()
        assert float((u @ w).abs().max()) < 0.9, j



def test_float32_directions_are_the_float64_ones_rounded():
    """Issue 23: draws once in float64, cast: a float32 run uses the float64 run's directions (up
    to float32 rounding), not another random stream."""
    n = 1000
    u64 = lv.sample_directions(n, [0, 5, 17], seed=3, dtype=torch.float64, device="cpu")
    u32 = lv.sample_directions(n, [0, 5, 17], seed=3, dtype=torch.float32, device="cpu")
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, rtol=4 * 2.0**-24, atol=0)  # a few float32 ulps
    # exactly: the float64 normals cast to float32, then normalised in float32
    g = torch.Generator().manual_seed(direction_seed(3, 5))
    z = torch.randn(n, generator=g, dtype=torch.float64).float()
    assert torch.equal(u32[1], z / torch.linalg.vector_norm(z[None], dim=1)[0])

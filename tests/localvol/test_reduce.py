"""Float64 row reductions (localvol._reduce) against exact integer arithmetic."""
import numpy as np
import pytest
import torch

from localvol import GaussianPrior, _reduce, unit_determinant_scales
from localvol._reduce import checksum64, row_dot64, row_dots64


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_reduce, "_CACHE_ELEMENTS", 64)  # many blocks and a partial last one


def test_row_dots64_is_exact_on_integers_across_blocks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-1000, 1000, (3, 1001), generator=gen).float()
    y = torch.randint(-1000, 1000, (1001,), generator=gen).float()
    w = torch.randint(1, 5, (1001,), generator=gen).double()
    xx, xy, xyw, xw = row_dots64((x, None, None), (x, y, None), (x, y, w), (x, None, 0.5))
    xi, yi, wi = x.long(), y.long(), w.long()
    assert xx.tolist() == (xi * xi).sum(1).tolist()
    assert xy.tolist() == (xi * yi).sum(1).tolist()
    assert xyw.tolist() == (xi * yi * wi).sum(1).tolist()
    assert xw.tolist() == [v / 2 for v in (xi * xi).sum(1).tolist()]
    assert xx.dtype == torch.float64 and xx.shape == (3,)


def test_row_dot64_shapes():
    x = torch.arange(10.0)
    assert row_dot64(x).shape == () and float(row_dot64(x)) == 285.0
    y = torch.ones(2, 10)
    np.testing.assert_array_equal(row_dot64(x, y).numpy(), [45.0, 45.0])  # 1-D x, 2-D y
    assert row_dot64(torch.zeros(0, 10)).shape == (0,)


def test_reductions_do_not_depend_on_the_thread_count(monkeypatch):
    """Shards of one estimate are written by processes with different thread counts: their
    fingerprints and per-sample terms must agree bit for bit."""
    monkeypatch.setattr(_reduce, "_CACHE_ELEMENTS", 1 << 17)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 300_007, generator=gen)
    a = torch.randn(300_007, generator=gen)
    w = torch.rand(300_007, generator=gen, dtype=torch.float64) + 0.5
    long = torch.randn(5_000_000, generator=gen)
    terms = [(u, None, None), (u, a, None), (u, None, w), (u, a, w), (a, None, None), (u[:1], a, w)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([t.tolist() for t in row_dots64(*terms)]
                           + [checksum64(long), float(row_dot64(long)),
                              checksum64(unit_determinant_scales(long.abs() + 0.1, eps=1e-3)),
                              GaussianPrior(w + 1.0).log_normaliser(w.numel())])
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


def test_sum_last_is_the_sum():
    x = torch.arange(3 * 2500, dtype=torch.float64).reshape(3, 2500)  # runs of 1024 and a tail
    np.testing.assert_array_equal(_reduce._sum_last(x).numpy(), x.numpy().sum(-1))
    assert float(_reduce._sum_last(torch.ones(1024, dtype=torch.float64))) == 1024.0
    assert float(_reduce._sum_last(torch.ones(7, dtype=torch.float64))) == 7.0

"""Float64 row reductions (localvol._reduce) against exact integer arithmetic."""
import numpy as np
import pytest
import torch

from localvol import _reduce
from localvol._reduce import row_dot64, row_dots64


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


def test_row_dots64_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(_reduce, "_CACHE_ELEMENTS", 1 << 17)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 300_007, generator=gen)
    a = torch.randn(300_007, generator=gen)
    w = torch.rand(300_007, generator=gen, dtype=torch.float64) + 0.5
    terms = [(u, None, None), (u, a, None), (u, None, w), (u, a, w)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([t.tolist() for t in row_dots64(*terms)])
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1]

from __future__ import annotations

import torch

from benchmark.train.monitors import is_collapsed, rankme, std_of_l2_normalized


def test_isotropic_gaussian_is_healthy() -> None:
    z = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert abs(std_of_l2_normalized(z) - 1.0) < 0.05
    assert 55 < rankme(z) <= 64
    assert not is_collapsed(std_of_l2_normalized(z), rankme(z), 64)


def test_constant_embeddings_are_collapsed() -> None:
    z = torch.ones(512, 64) + 1e-6 * torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert std_of_l2_normalized(z) < 1e-3
    assert rankme(z) < 1.1
    assert is_collapsed(std_of_l2_normalized(z), rankme(z), 64)


def test_rank_of_a_rank_two_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=g) @ torch.randn(2, 64, generator=g)
    assert 1.5 < rankme(z) < 2.01

"""Projection and prediction heads shared by method plugins."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, bn_last: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU blocks then a final Linear (optionally followed by a BN without affine).

    `layers=2` is the SimCLR v1 / BYOL head, `layers=3` SimCLR v2's.
    """
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not bn_last))
    if bn_last:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)

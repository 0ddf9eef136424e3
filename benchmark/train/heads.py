"""Projection and prediction heads shared by method plugins."""

from __future__ import annotations

from torch import nn


def mlp_stack(in_dim: int, dims: tuple[int, ...], hidden_bias: bool) -> nn.Sequential:
    """(Linear-BN-ReLU) for every width in `dims` but the last, then a bias-free Linear: the Barlow Twins
    projector (`hidden_bias=False`) and the VICReg expander (`hidden_bias=True`), as in their official code."""
    mods: list[nn.Module] = []
    d = in_dim
    for h in dims[:-1]:
        mods += [nn.Linear(d, h, bias=hidden_bias), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    mods.append(nn.Linear(d, dims[-1], bias=False))
    return nn.Sequential(*mods)


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

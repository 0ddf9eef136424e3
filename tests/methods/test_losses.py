"""Each loss against its formula on a hand-computed case."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.byol import byol_loss, momentum_at
from methods.simclr import nt_xent


def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Paper eq. 1 written as loops: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_hand_case() -> None:
    # two orthogonal pairs of identical views: s_ii' = 1, all negatives 0
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))  # positive e^{1/t}, two negatives e^0
    assert math.isclose(float(nt_xent(z1, z1.clone(), t)), expected, rel_tol=1e-6)


def test_nt_xent_matches_the_loop_formula_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert math.isclose(float(nt_xent(z1, z2, 0.2)), _nt_xent_reference(z1, z2, 0.2), rel_tol=1e-5)
    assert math.isclose(float(nt_xent(z1, z2, 0.2)), float(nt_xent(z2, z1, 0.2)), rel_tol=1e-6)
    # invariant to the scale of the projections (it normalises)
    assert math.isclose(float(nt_xent(3 * z1, z2, 0.2)), float(nt_xent(z1, z2, 0.2)), rel_tol=1e-5)


def test_byol_loss_hand_case() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [1.0, 1.0]])  # cos = 0 and 1
    assert math.isclose(float(byol_loss(p, z)), 2 - 2 * 0.5, rel_tol=1e-6)
    assert float(byol_loss(z, z)) < 1e-6
    assert math.isclose(float(byol_loss(p, -p)), 4.0, rel_tol=1e-6)


def test_byol_loss_does_not_backpropagate_into_the_target() -> None:
    p = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_byol_momentum_schedule_goes_from_base_to_one() -> None:
    assert math.isclose(momentum_at(0.996, 0.0), 0.996)
    assert math.isclose(momentum_at(0.996, 1.0), 1.0)
    assert math.isclose(momentum_at(0.996, 0.5), 0.998)


def test_nt_xent_in_two_processes_equals_one_process_on_the_global_batch() -> None:
    from tests.ddp import pair_loss_in_processes

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    losses, ref = pair_loss_in_processes(nt_xent, z1, z2, 0.3)  # also checks the DDP-averaged gradients
    assert math.isclose(sum(losses) / 2, ref, rel_tol=1e-5)


def test_simclrv2_has_a_three_layer_head_and_a_finetune_start() -> None:
    from benchmark.backbones import ConvNet
    from methods.simclr import ConfigV2, SimCLRv2

    model = SimCLRv2(ConvNet(1, (4, 8)), ConfigV2(proj_hidden_dim=16, proj_dim=8))
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 8), (16, 16), (8, 16)]
    ft = model.finetune_module().eval()
    assert ft(torch.randn(3, 1, 8, 8)).shape == (3, 16)
    assert ft[0] is model.backbone

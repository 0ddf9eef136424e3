"""The shared 'loss falls over 20 SGD steps on a fixed batch' check used by the method tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def method_loss(model: nn.Module, views: list[Tensor], progress: float = 0.0, labels: Tensor | None = None) -> Tensor:
    """`model.loss` as the loop calls it: methods with `uses_indices` get the batch's rows 0..B-1 of the training set."""
    if getattr(model, "uses_indices", False):
        return model.loss(views, progress, labels, indices=torch.arange(len(views[0])))  # type: ignore[operator, no-any-return]
    return model.loss(views, progress, labels)  # type: ignore[operator, no-any-return]


def sgd_losses(model: nn.Module, views: list[Tensor], progress: float = 0.0, labels: Tensor | None = None,
               before_step: Callable[[], object] | None = None, steps: int = 20) -> list[float]:
    """The losses of `steps` SGD steps (lr 0.05, momentum 0.9) on the fixed `views`."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        if before_step is not None:
            before_step()
        loss = method_loss(model, views, progress, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def assert_loss_falls(model: nn.Module, views: list[Tensor], progress: float = 0.0, labels: Tensor | None = None,
                      before_step: Callable[[], object] | None = None, steps: int = 20) -> list[float]:
    """`sgd_losses`, then: the mean of the last 3 losses must be < 0.9 x the mean of the first 3."""
    losses = sgd_losses(model, views, progress, labels, before_step, steps)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    return losses

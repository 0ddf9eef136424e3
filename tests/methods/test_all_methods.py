"""Every registered method: one loss step at 16x16 on CPU, finite loss, weights change; losses fall."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from benchmark.config import PretrainConfig, apply_overrides
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import NotApplicable
from benchmark.registry import METHODS, SUITES
from benchmark.run.runner import _fill_from_data
from benchmark.train.pretrain import build_method
from tests.methods.steps import assert_loss_falls, method_loss

# On a fixed batch these losses need not fall, by design; each method's own test file checks that its
# loss falls in a setting where it must (queue reset per step, centre held, ...).
NOT_ON_A_FIXED_BATCH = {
    "mocov2": "the queue fills with copies of the batch's own keys (test_mocov2 resets the queue)",
    "swav": "codes settle at ln K on one small batch (test_swav uses K=10)",
    "dino": "the moving centre raises the teacher entropy term (test_dino holds the centre)",
    "npid": "the random initial bank: the batch's embeddings draw together and meet their own rows as noise "
            "(test_npid fills the bank with real embeddings first)",
    "deepcluster": "pseudo-labels are i mod K before the first clustering (test_deepcluster clusters first)",
    "pcl": "MoCo v2's queue fills with the batch's own keys (test_pcl holds the queue)",
    "densecl": "the queues fill with copies of the batch's own keys (test_densecl holds both queues)",
}


def _build(name: str, data: Splits) -> torch.nn.Module:
    """The method at the smoke suite's scale (tiny heads), as `--suite smoke` runs it; a method that does not
    apply to the (1-channel) data is skipped here: its own test file covers it on data it fits."""
    smoke = SUITES.get("smoke").overrides.get(name, {})
    cfg = _fill_from_data(apply_overrides(METHODS.default_config(name), smoke, name), data.num_classes, len(data.train))
    backbone = (METHODS.entry(name).meta.get("backbones") or ("convnet_tiny",))[0]  # MAE: a ViT
    try:
        return build_method(METHODS.get(name), cfg, PretrainConfig(backbone=backbone), data, seed=0)
    except NotApplicable as e:
        pytest.skip(f"{name}: {e}")


def _views(model: torch.nn.Module, data: Splits, step: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    x, y = data.train.x[:32], data.train.y[:32]
    return make_views(x, model.views(16), data.mean, data.std, torch.Generator().manual_seed(step)), y


@pytest.mark.parametrize("name", METHODS.names())
def test_one_step_gives_a_finite_loss_and_changes_the_encoder(name: str, digits: Splits) -> None:
    model = _build(name, digits)
    if not getattr(model, "trainable", True):
        assert model.views(16) == []
        return
    before = copy.deepcopy(model.encoder().state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    views, y = _views(model, digits)
    labels = y if getattr(model, "uses_labels", False) else None
    loss = method_loss(model, views, 0.0, labels)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.encoder().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


TRAINABLE = [n for n in METHODS.names() if getattr(METHODS.get(n), "trainable", True)]


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_falls_within_20_steps_on_real_data(name: str, digits: Splits) -> None:
    if name in NOT_ON_A_FIXED_BATCH:
        pytest.skip(NOT_ON_A_FIXED_BATCH[name])
    torch.manual_seed(0)
    model = _build(name, digits)
    views, y = _views(model, digits)  # a fixed batch: the loss must go down on it
    assert_loss_falls(model, views, labels=y if getattr(model, "uses_labels", False) else None)


def test_ssl_methods_never_see_labels(digits: Splits, tmp_path: Path) -> None:
    """Only the supervised baseline asks for labels, and the loop hands an SSL method none (it was a tautology: it
    checked `uses_labels` only on the methods whose `uses_labels` was already false)."""
    from benchmark.train.method import Hooks
    from benchmark.train.pretrain import pretrain

    assert {n for n in METHODS.names() if Hooks.of(METHODS.get(n)).uses_labels} == {"supervised"}
    for name in ("simclr", "supervised"):
        torch.manual_seed(0)
        model = _build(name, digits)
        seen: list[object] = []
        real = model.loss

        def spy(views: list[torch.Tensor], progress: float, labels: torch.Tensor | None = None, *, _seen: list[object] = seen,
                _real: object = real, **kw: torch.Tensor) -> torch.Tensor:
            _seen.append(labels)
            return _real(views, progress, labels, **kw)  # type: ignore[operator,no-any-return]

        model.loss = spy  # type: ignore[method-assign]
        pretrain(model, digits, PretrainConfig(backbone="convnet_tiny", epochs=1, batch_size=256), 0, tmp_path / name,
                 torch.device("cpu"), progress=False)
        assert seen and (all(y is None for y in seen) if name == "simclr" else all(isinstance(y, torch.Tensor) for y in seen))


def test_a_method_without_a_suite_entry_runs_on_its_defaults_and_the_suites_generic_settings() -> None:
    """Suites list deliberate deviations only (CPU-sized heads); with its entry removed, a method plans with its own
    Config defaults and the suite's generic data / pretrain settings (a plugin run end to end: tests/test_plugins.py)."""
    from benchmark.run.runner import Request, plan

    smoke = SUITES.get("smoke").overrides
    ov = {k: v for k, v in smoke.items() if k != "byol"}
    (task,) = plan(Request(("byol",), ("knn",), ("digits",), (0,), ov, "/nonexistent", "smoke")).evals
    assert task.pretrain.method_cfg == METHODS.default_config("byol") != apply_overrides(METHODS.default_config("byol"), smoke["byol"], "byol")
    assert (task.pretrain.pretrain.backbone, task.pretrain.pretrain.epochs) == ("convnet_tiny", 1)

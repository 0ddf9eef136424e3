"""The method contract (benchmark/train/method.py): required members checked, optional ones read once with their
defaults, wrong types stopped; every registered method fulfils it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.registry import METHODS
from benchmark.train.method import REQUIRED, Hooks, Method, check_method


class Bare(nn.Module):
    def views(self, image_size: int) -> list:  # type: ignore[type-arg]
        return []

    def loss(self, views: list, progress: float, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[type-arg]
        return torch.zeros(())

    def encoder(self) -> nn.Module:
        return self


def test_a_method_without_optional_members_gets_the_defaults() -> None:
    h = check_method(Bare())
    assert h == Hooks(uses_labels=False, uses_indices=False, trainable=True, sync_bn=False)
    assert h.before_epoch is None and h.param_groups is None and h.weight_decay_at is None


def test_optional_members_are_read_from_the_method() -> None:
    class Full(Bare):
        uses_indices = True
        sync_bn = True

        def before_epoch(self, epoch: int, splits: object, device: torch.device, seed: int) -> None:
            self.seen = epoch

        def weight_decay_at(self, progress: float, base: float) -> float:
            return base * (1 + progress)

    m = Full()
    h = Hooks.of(m)
    assert h.uses_indices and h.sync_bn and not h.uses_labels and h.trainable
    assert h.weight_decay_at is not None and h.weight_decay_at(0.5, 0.1) == pytest.approx(0.15)
    assert h.before_epoch is not None
    h.before_epoch(3, None, torch.device("cpu"), 0)  # type: ignore[arg-type]
    assert m.seen == 3


def test_the_adapter_passes_indices_only_to_methods_that_ask() -> None:
    got: dict[str, object] = {}

    class Banked(Bare):
        uses_indices = True

        def loss(self, views: list, progress: float, labels: torch.Tensor | None = None, **extra: torch.Tensor) -> torch.Tensor:  # type: ignore[type-arg]
            got.update(extra, progress=progress)
            return torch.zeros(())

    idx = torch.arange(4)
    Hooks.of(Banked()).loss(Banked(), [], 0.25, None, idx)  # type: ignore[arg-type]
    assert got["progress"] == 0.25 and torch.equal(got["indices"], idx)  # type: ignore[arg-type]
    Hooks.of(Bare()).loss(Bare(), [], 0.5, None, idx)  # type: ignore[arg-type]  # Bare.loss takes no indices: no TypeError


@pytest.mark.parametrize("attr, value, message", [
    ("uses_indices", 1, "uses_indices must be True or False, got 1"),
    ("trainable", "no", "trainable must be True or False"),
    ("before_epoch", 3, "before_epoch must be a method, got int"),
])
def test_a_wrong_type_is_named(attr: str, value: object, message: str) -> None:
    bad = type("Bad", (Bare,), {attr: value})
    with pytest.raises(TypeError, match=message):
        check_method(bad())


def test_a_missing_required_member_is_named() -> None:
    class NoEncoder(nn.Module):
        def views(self, image_size: int) -> list:  # type: ignore[type-arg]
            return []

    with pytest.raises(TypeError, match=r"method NoEncoder lacks loss\(\), encoder\(\): see benchmark.train.method.Method"):
        check_method(NoEncoder())


def test_the_protocol_declares_and_documents_every_member_the_loop_uses() -> None:
    """Every required member and every field of the adapter is a member of `Method`, each with its own docstring
    (a method's docstring, or the string right after an attribute's annotation)."""
    import ast
    import dataclasses
    import inspect

    import benchmark.train.method as contract

    cls = next(n for n in ast.parse(inspect.getsource(contract)).body if isinstance(n, ast.ClassDef) and n.name == "Method")
    documented = set()
    for node, after in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            documented.add(node.name)
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            documented.add(node.target.id)  # type: ignore[union-attr]
    wanted = set(REQUIRED) | {f.name for f in dataclasses.fields(Hooks)}
    assert wanted == documented, wanted ^ documented
    assert set(Method.__annotations__) | set(REQUIRED) <= wanted


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_fulfils_the_contract(name: str) -> None:
    cls = METHODS.get(name)
    hooks = check_method(cls)  # on the class: flags and hooks as the instances will have them
    for flag in ("uses_labels", "uses_indices", "trainable", "sync_bn"):
        assert getattr(hooks, flag) is bool(getattr(cls, flag, flag == "trainable")), (name, flag)


def test_a_declared_loss_bound_is_read_and_checked() -> None:
    from benchmark.train.method import LOSS_BOUND

    assert check_method(Bare()).loss_bound == LOSS_BOUND
    assert Hooks.of(METHODS.get("simsiam")).loss_bound == pytest.approx(1.001)
    for bad in (True, "1e3", 0, -1.0):
        class Wrong(Bare):
            loss_bound = bad

        with pytest.raises(TypeError, match="loss_bound must be a positive number"):
            check_method(Wrong())

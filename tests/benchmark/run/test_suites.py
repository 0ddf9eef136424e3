from __future__ import annotations

import pytest

from benchmark.config import CORE_SECTIONS
from benchmark.registry import DATASETS, METHODS, PROTOCOLS, SUITES
from benchmark.run.runner import Request, plan
from benchmark.run.suites import Suite


def test_the_three_suites_exist_and_name_registered_plugins() -> None:
    assert {"smoke", "default", "gpu"} <= set(SUITES.names())
    for name in SUITES.names():
        s: Suite = SUITES.get(name)
        assert all(m in METHODS for m in s.methods) and all(p in PROTOCOLS for p in s.protocols)
        assert all(d in DATASETS for d in s.datasets) and s.seeds
        per_method = {f"pretrain@{m}" for m in METHODS.names()}
        assert set(s.overrides) <= set(CORE_SECTIONS) | set(METHODS.names()) | set(PROTOCOLS.names()) | per_method
        assert s.on_gpu is None or s.on_gpu in SUITES


@pytest.mark.parametrize("name", ["smoke", "default", "gpu"])
def test_every_suite_resolves_to_a_valid_plan(name: str) -> None:
    s: Suite = SUITES.get(name)
    req = Request(s.methods, s.protocols, ("digits",), s.seeds, {**s.overrides, "data": {}}, "/nonexistent", name)
    p = plan(req)
    assert len(p.evals) == len(s.methods) * len(s.protocols) * len(s.seeds)

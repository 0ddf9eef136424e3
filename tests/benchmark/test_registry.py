from __future__ import annotations

import pytest

from benchmark.errors import ConfigError
from benchmark.registry import METHODS, PROTOCOLS, Registry


def test_duplicate_name_raises() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'byl'; did you mean 'byol'\? known: .*simclr"):
        METHODS.get("byl")


def test_names_are_sorted_and_lowercase() -> None:
    for reg in (METHODS, PROTOCOLS):
        assert reg.names() == sorted(reg.names())
        assert all(n == n.lower() for n in reg.names())
    with pytest.raises(ValueError, match="lowercase"):
        Registry("x").register("BYOL")


def test_protocols_declare_a_version() -> None:
    for name in PROTOCOLS.names():
        assert PROTOCOLS.entry(name).meta.get("version"), name

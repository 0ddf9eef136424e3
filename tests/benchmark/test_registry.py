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


def test_registration_keys_are_checked_when_a_plugin_registers() -> None:
    from dataclasses import dataclass

    from benchmark.errors import PluginError

    reg: Registry[int] = Registry("method", meta={"backbones": "the backbones it works on", "pretrain": "defaults"})
    reg.register("ok", backbones=("convnet",), pretrain={})(1)
    assert reg.entry("ok").meta == {"backbones": ("convnet",), "pretrain": {}}
    with pytest.raises(PluginError, match=r"method 'typo': unknown registration key 'backbone'; did you mean 'backbones'\? "
                                          r"valid keys: backbones, pretrain"):
        reg.register("typo", backbone=("convnet",))
    with pytest.raises(PluginError, match="config must be a dataclass"):
        reg.register("bad", config=dict)

    @dataclass(frozen=True)
    class Cfg:
        k: int = 1

    reg.register("good", config=Cfg)(2)
    assert reg.default_config("good") == Cfg()
    assert "typo" not in reg and "bad" not in reg


def test_the_real_registries_declare_their_keys() -> None:
    assert set(METHODS.meta_keys) == {"pretrain", "pretrain_fixed", "backbones"}
    assert set(PROTOCOLS.meta_keys) == {"version", "multilabel", "label_efficiency"}
    for reg in (METHODS, PROTOCOLS):
        for name in reg.names():
            assert set(reg.entry(name).meta) <= set(reg.meta_keys), name

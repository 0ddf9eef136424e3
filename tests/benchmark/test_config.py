from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmark.config import DataConfig, PretrainConfig, apply_overrides, config_hash, load_yaml, merge, parse_set, to_dict
from benchmark.errors import ConfigError


def test_unknown_key_names_the_valid_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown key pretrain\.lrr; valid fields of pretrain: .*\blr\b"):
        apply_overrides(PretrainConfig(), {"lrr": 0.1}, "pretrain")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("lr", 0.0, "pretrain.lr must be a finite number > 0"),
        ("lr", -1.0, "pretrain.lr must be"),
        ("lr", float("nan"), "pretrain.lr must be finite"),
        ("lr", "fast", "pretrain.lr must be a number"),
        ("batch_size", 0, "pretrain.batch_size must be > 0"),
        ("batch_size", 2.5, "pretrain.batch_size must be an integer"),
        ("epochs", -1, "pretrain.epochs must be >= 0"),
        ("optimizer", "adam", "pretrain.optimizer must be one of sgd, adamw, lars"),
        ("amp", "yes", "pretrain.amp must be true or false"),
    ],
)
def test_bad_values_are_rejected(key: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(PretrainConfig(), {key: value}, "pretrain")


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("inf"))).filter(lambda v: not (0 < v < 1)))
def test_val_fraction_outside_unit_interval_is_rejected(v: float) -> None:
    with pytest.raises(ConfigError, match="data.val_fraction"):
        apply_overrides(DataConfig(), {"val_fraction": v}, "data")


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=1e-8, max_value=1e3), st.integers(min_value=1, max_value=4096))
def test_valid_configs_round_trip_through_yaml(lr: float, bs: int) -> None:
    cfg = apply_overrides(PretrainConfig(), {"lr": lr, "batch_size": bs}, "pretrain")
    again = apply_overrides(PretrainConfig(), yaml.safe_load(yaml.safe_dump(to_dict(cfg))), "pretrain")
    assert again == cfg


def test_numeric_strings_from_the_command_line() -> None:
    # YAML reads "1e-3" as a string; a float field accepts it
    ov = parse_set(["pretrain.lr=1e-3", "pretrain.epochs=3", "knn.k=20", "data.root=/x"])
    assert ov == {"pretrain": {"lr": "1e-3", "epochs": 3}, "knn": {"k": 20}, "data": {"root": "/x"}}
    assert apply_overrides(PretrainConfig(), ov["pretrain"], "pretrain").lr == 1e-3


@pytest.mark.parametrize("item", ["pretrain", "lr=0.1", "pretrain.=1", ".lr=1", "a.b.c=1"])
def test_malformed_set_items(item: str) -> None:
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        parse_set([item])


def test_hash_is_stable_semantic_and_ignores_workers_and_paths() -> None:
    a = {"pretrain": PretrainConfig(), "data": DataConfig()}
    b = {"data": DataConfig(), "pretrain": PretrainConfig()}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash({**a, "pretrain": dataclasses.replace(PretrainConfig(), checkpoint_every=8)})
    assert config_hash(a) == config_hash({**a, "data": DataConfig(root="/elsewhere")})
    assert config_hash(a) != config_hash({**a, "pretrain": PretrainConfig(lr=0.051)})


def test_fields_added_later_keep_earlier_hashes_until_set() -> None:
    # 06a0ebc0b597: the default pretraining section's hash before `min_lr` existed (sessions 1-4's run directories)
    assert config_hash({"pretrain": PretrainConfig()}) == "06a0ebc0b597"
    assert "min_lr" not in to_dict(PretrainConfig(), semantic_only=True)
    assert to_dict(PretrainConfig(min_lr=1e-6), semantic_only=True)["min_lr"] == 1e-6
    assert config_hash({"pretrain": PretrainConfig(min_lr=1e-6)}) != "06a0ebc0b597"
    with pytest.raises(ConfigError, match=r"pretrain.min_lr must be in \[0, lr=0.05\)"):
        PretrainConfig(min_lr=0.05)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("knn:\n  k: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+"):
        load_yaml(bad)
    flat = tmp_path / "flat.yaml"
    flat.write_text("k: 20\n")
    with pytest.raises(ConfigError, match="must map section names to mappings"):
        load_yaml(flat)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_later_layers_win() -> None:
    assert merge({"knn": {"k": 1, "temperature": 0.1}}, {"knn": {"k": 2}}) == {"knn": {"k": 2, "temperature": 0.1}}
    assert math.isclose(apply_overrides(PretrainConfig(), {"lr": 1}, "pretrain").lr, 1.0)

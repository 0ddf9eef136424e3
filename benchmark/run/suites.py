"""Named suites (benchmark/suites.yaml): a grid of names plus config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import ConfigError
from benchmark.registry import SUITES


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    methods: tuple[str, ...]
    protocols: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    on_gpu: str | None = None  # suite to run instead when a GPU is present and no suite was named


def _load(path: Path) -> None:
    for name, spec in yaml.safe_load(path.read_text()).items():
        if name.startswith("_"):  # shared blocks referenced by anchors
            continue
        try:
            suite = Suite(
                name=name,
                description=str(spec["description"]),
                methods=tuple(spec["methods"]),
                protocols=tuple(spec["protocols"]),
                datasets=tuple(spec["datasets"]),
                seeds=tuple(int(s) for s in spec.get("seeds", [0])),
                overrides=dict(spec.get("overrides", {})),
                on_gpu=spec.get("on_gpu"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"suite {name!r} in {path} is malformed: {e}") from None
        SUITES.register(name)(suite)


_load(Path(__file__).with_name("suites.yaml"))

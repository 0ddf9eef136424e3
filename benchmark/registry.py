"""Strict name -> object registries for methods, protocols, datasets, backbones and suites."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from benchmark.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object plus its declared metadata (config class, version, ...)."""

    name: str
    obj: T
    config: type | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names map to entries. Duplicates raise; unknown names raise with a suggestion."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config: type | None = None, **meta: Any
    ) -> Callable[[T], T]:
        """Decorator: `@REG.register("my_method", config=Config)`."""
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and '_'")

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, obj, config, dict(meta))
            return obj

        return deco

    def default_config(self, name: str) -> Any:
        """A fresh instance of the config dataclass registered with `name`."""
        cfg = self.entry(name).config
        if cfg is None:
            raise TypeError(f"{self.kind} {name!r} has no config class")
        return cfg()

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint} known: {', '.join(known)}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def version(self, name: str) -> str:
        """The registered `version` (protocols: part of each result's key), "1" when none was declared."""
        return str(self.entry(name).meta.get("version", "1"))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


METHODS: Registry[Any] = Registry("method")
PROTOCOLS: Registry[Any] = Registry("protocol")
DATASETS: Registry[Any] = Registry("dataset")
BACKBONES: Registry[Any] = Registry("backbone")
SUITES: Registry[Any] = Registry("suite")

register_method = METHODS.register
register_protocol = PROTOCOLS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register

"""Strict name -> object registries for methods, protocols, datasets, backbones and suites, and the discovery of
plugin modules (every module of `methods/` and `protocols/`, plus the folders named in `$SSLBENCH_PLUGINS`)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping, MutableSequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from benchmark.errors import ConfigError, PluginError

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

    def __init__(self, kind: str, meta: Mapping[str, str] | None = None) -> None:
        """`meta`: the metadata keys a registration may declare, each with what it means (none by default)."""
        self.kind = kind
        self.meta_keys = dict(meta or {})
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config: type | None = None, **meta: Any
    ) -> Callable[[T], T]:
        """Decorator: `@REG.register("my_method", config=Config)`. Raises at registration for a malformed name, a
        config that is not a dataclass, or a metadata key this registry does not know (naming the valid ones)."""
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise PluginError(f"{self.kind} name {name!r} must be lowercase letters, digits and '_'")
        if config is not None and not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            raise PluginError(f"{self.kind} {name!r}: config must be a dataclass class, got {config!r}")
        unknown = sorted(set(meta) - set(self.meta_keys))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.meta_keys), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(self.meta_keys)) or "none"
            raise PluginError(f"{self.kind} {name!r}: unknown registration key {unknown[0]!r}{hint} valid keys: {valid} "
                              f"(their meaning: benchmark.registry.{self.kind.upper()}S)")

        def deco(obj: T) -> T:
            if name in self._entries:
                raise PluginError(f"{self.kind} {name!r} is already registered")
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


METHODS: Registry[Any] = Registry("method", meta={
    "pretrain": "the method's own pretraining defaults (dict of PretrainConfig fields), below the suite and the user",
    "pretrain_fixed": "pretraining settings the method always uses (dict of PretrainConfig fields), above everything",
    "backbones": "the backbones it works on (tuple of names; any other is replaced by the first)",
})
PROTOCOLS: Registry[Any] = Registry("protocol", meta={
    "version": "the protocol's version (a string, part of every result's key)",
    "multilabel": "True: it accepts multi-label datasets (VOC07)",
    # read by the report's label-efficiency curves
    "label_efficiency": "where its test rows sit on a label-efficiency curve: 'suffix' (the metric name says it: "
                        "_1pct, _10pct = share of the labels; _k16 = labelled images per class) or a share in (0, 1] "
                        "(1.0: trained on every label)",
})
DATASETS: Registry[Any] = Registry("dataset")
BACKBONES: Registry[Any] = Registry("backbone")
SUITES: Registry[Any] = Registry("suite")

register_method = METHODS.register
register_protocol = PROTOCOLS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register


def discover(package: str, path: MutableSequence[str]) -> None:
    """Import every module of the plugin package `package` (its folder `path`, the package's `__path__`), which
    registers them; then the same for each `<DIR>/<package>/` of the folders in `$SSLBENCH_PLUGINS` (separated by
    the OS path separator), which join the package, so `methods.my_method` resolves in every process that has the
    variable (SLURM jobs inherit it). Modules whose names start with "_" are skipped. A plugin folder that does
    not exist, or a plugin file named like a built-in one, raises ConfigError."""
    own = {m.name for m in pkgutil.iter_modules(path)}
    for folder in plugin_folders(package):
        if folder not in path:
            clash = sorted(own & {m.name for m in pkgutil.iter_modules([folder])})
            if clash:
                raise ConfigError(f"plugin {Path(folder) / clash[0]}.py has the name of a built-in {package} module; rename it")
            path.append(folder)
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def plugin_folders(package: str) -> list[str]:
    """`<DIR>/<package>` for each DIR in `$SSLBENCH_PLUGINS`."""
    folders = []
    for d in filter(None, os.environ.get("SSLBENCH_PLUGINS", "").split(os.pathsep)):
        if not Path(d).is_dir():
            raise ConfigError(f"$SSLBENCH_PLUGINS names {d}, which is not a folder (it should hold methods/ and/or protocols/)")
        if (Path(d) / package).is_dir():
            folders.append(str(Path(d, package).resolve()))
    return folders

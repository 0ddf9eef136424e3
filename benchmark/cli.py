"""Command line: `python run_benchmark.py [--methods a,b] [--protocols ...] [--suite NAME] ...`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import methods  # noqa: F401  (registers the method plugins)
import protocols  # noqa: F401  (registers the protocol plugins)
from benchmark import config as C
from benchmark.device import default_device, describe
from benchmark.errors import ConfigError, SSLBenchError
from benchmark.executor import EXECUTORS
from benchmark.registry import BACKBONES, DATASETS, METHODS, PROTOCOLS, SUITES
from benchmark.runner import Request, plan, run
from benchmark.suites import Suite


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Pretrain self-supervised methods and evaluate them under fixed protocols.",
    )
    p.add_argument("--list", action="store_true", help="print registered methods, protocols, datasets, backbones, suites")
    p.add_argument("--suite", help="named grid and settings (default: 'default', or its GPU variant on a GPU)")
    p.add_argument("--methods", help="comma-separated method names (default: the suite's)")
    p.add_argument("--protocols", help="comma-separated protocol names (default: the suite's)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: the suite's)")
    p.add_argument("--seeds", help="comma-separated integer seeds (default: the suite's)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of overrides {section: {key: value}}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help="override, e.g. --set knn.k=200")
    p.add_argument("--data-root", help="dataset folder (same as --set data.root=DIR)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--executor", default="local", choices=sorted(EXECUTORS), help="where jobs run")
    p.add_argument("--force", action="store_true", help="rerun cells that already have results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log each epoch")
    return p


def _names(raw: str | None, default: tuple[str, ...], what: str) -> tuple[str, ...]:
    if raw is None:
        return default
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--{what} is empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"--{what} lists a name twice: {raw}")
    return names


def _seeds(raw: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if raw is None:
        return default
    try:
        seeds = tuple(int(s) for s in raw.split(","))
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {raw!r}") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {raw!r}")
    return seeds


def print_list() -> None:
    for title, reg in (("methods", METHODS), ("protocols", PROTOCOLS), ("datasets", DATASETS), ("backbones", BACKBONES)):
        items = []
        for name in reg.names():
            version = reg.entry(name).meta.get("version")
            items.append(f"{name}@{version}" if version else name)
        print(f"{title}: {', '.join(items)}")
    print("suites:")
    for name in SUITES.names():
        s: Suite = SUITES.get(name)
        print(f"  {name}: {s.description}")


def device_of(raw: str | None) -> torch.device:
    if raw is None:
        return default_device()
    try:
        dev = torch.device(raw)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {raw!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {raw}: no CUDA device is available; use --device cpu")
    return dev


def build_request(args: argparse.Namespace) -> Request:
    device = device_of(args.device)
    suite_name = args.suite or "default"
    suite: Suite = SUITES.get(suite_name)
    if args.suite is None and device.type == "cuda" and suite.on_gpu:
        suite = SUITES.get(suite.on_gpu)
    user = C.merge(*(C.load_yaml(f) for f in args.config), C.parse_set(args.sets))
    if args.data_root:
        user = C.merge(user, {"data": {"root": args.data_root}})
    return Request(
        methods=_names(args.methods, suite.methods, "methods"),
        protocols=_names(args.protocols, suite.protocols, "protocols"),
        datasets=_names(args.datasets, suite.datasets, "datasets"),
        seeds=_seeds(args.seeds, suite.seeds),
        overrides=C.merge(suite.overrides, user),
        out=args.out,
        suite=suite.name,
        device=str(device),
        force=args.force,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.list:
            print_list()
            return 0
        req = build_request(args)
        p = plan(req)
        out = Path(req.out)
        print(f"sslbench: suite {req.suite}, {len(req.methods)} methods x {len(req.protocols)} protocols x "
              f"{len(req.datasets)} datasets x {len(req.seeds)} seeds on {describe(torch.device(req.device))} -> {out}/")
        t0 = time.perf_counter()
        summary = run(p, EXECUTORS[args.executor](), out, force=req.force)
    except SSLBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print((out / "leaderboard.md").read_text())
    print(f"{summary.done} cells done, {summary.skipped} reused, {len(summary.failed)} failed in {time.perf_counter() - t0:.0f}s; "
          f"tables in {out}/ (results.csv, leaderboard.csv, leaderboard.md)")
    if summary.diverged:
        print(f"diverged (no metrics): {', '.join(summary.diverged)}")
    if summary.failed:
        print(f"failed: {', '.join(summary.failed)} (details in {out}/failures.csv and {out}/records/)", file=sys.stderr)
        return 1
    return 0

"""Command line: `python run_benchmark.py [--methods a,b] [--protocols ...] [--suite NAME] ...`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from benchmark import config as C
from benchmark.device import default_device, describe
from benchmark.errors import ConfigError, SSLBenchError
from benchmark.registry import BACKBONES, DATASETS, METHODS, PROTOCOLS, SUITES, discover
from benchmark.run.executor import EXECUTORS, SlurmConfig, make_executor
from benchmark.run.runner import CheckpointSpec, Request, TablesNotWritten, extract_part, plan, run
from benchmark.run.suites import Suite
from benchmark.store.io import check_writable_dir, check_writable_file


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
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: here, one task after another; slurm: job arrays through submitit; debug: submitit in-process")
    s = p.add_argument_group("SLURM (--executor slurm)")
    s.add_argument("--slurm-partition", help="partition (default: the cluster's default)")
    s.add_argument("--slurm-account", help="account to charge")
    s.add_argument("--slurm-qos", help="quality of service")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node for pretraining (one task per GPU, DDP); evaluation jobs get 1")
    s.add_argument("--nodes", type=int, default=1, help="nodes per pretraining job")
    s.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per task (data loading)")
    s.add_argument("--mem-gb", type=float, help="memory per node in GB")
    s.add_argument("--timeout-min", type=int, default=60, help="time limit per job; a job at its limit is checkpointed and requeued")
    s.add_argument("--array-parallelism", type=int, default=64, help="array tasks that may run at once")
    s.add_argument("--max-requeues", type=int, default=3, help="preemptions / time-outs a job may be requeued after")
    s.add_argument("--slurm-set", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option, e.g. constraint=a100")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH[@ARCH]",
                   help="evaluate a checkpoint file as a leaderboard row (repeatable); ARCH e.g. resnet50, else inferred")
    p.add_argument("--checkpoint-layout", help="layout of the --checkpoint files when detection is ambiguous (see --list)")
    p.add_argument("--trust-checkpoint", action="append", nargs="?", const="*", default=[], metavar="NAME",
                   help="allow a full pickle load of the --checkpoint NAME (repeatable; bare: every --checkpoint): "
                        "only for files you trust, it may run code")
    p.add_argument("--student", action="store_true", help="teacher/student checkpoints (DINO): evaluate the student")
    p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                   help="a folder holding methods/*.py and/or protocols/*.py to register beside the built-in plugins "
                        "(repeatable; the same as $SSLBENCH_PLUGINS, which jobs inherit)")
    p.add_argument("--force", action="store_true", help="rerun cells that already have results")
    p.add_argument("--extract-part", metavar="I/N", help="only extract part I of N (1-based) of the frozen features the cells "
                   "read, e.g. one SLURM array task or GPU each; then run the same command without it")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.html (the HTML report; also "
                   "`run_benchmark.py report --out OUT`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--logger", default="none", choices=["none", "tensorboard"],
                   help="tensorboard: each epoch's loss, monitors, online kNN and lr to <run dir>/tensorboard/ "
                        "(same as --set pretrain.tensorboard=true; pip install tensorboard)")
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
    if len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**63 for s in seeds):
        raise ConfigError(f"--seeds must be distinct integers in [0, 2^63), got {raw[:100]!r}")
    return seeds


def parse_checkpoint(raw: str, args: argparse.Namespace) -> CheckpointSpec:
    """`NAME=PATH[@ARCH]` -> a spec; the path must be an existing file (never a random initialisation)."""
    name, sep, rest = raw.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--checkpoint must be NAME=PATH[@ARCH], got {raw!r}")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"--checkpoint name {name!r} may hold only letters, digits, '_', '-' and '.'")
    path, _, arch = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not Path(path).exists():
        raise ConfigError(f"--checkpoint {name}: {path} does not exist (a missing checkpoint is never replaced by a random init)")
    if Path(path).is_dir():
        raise ConfigError(f"--checkpoint {name}: {path} is a directory; give the checkpoint file inside it")
    trusted = args.trust_checkpoint if isinstance(args.trust_checkpoint, list) else (["*"] if args.trust_checkpoint else [])
    return CheckpointSpec(name, path, arch or None, args.checkpoint_layout, "*" in trusted or name in trusted, not args.student)


def load_plugins(folders: list[str]) -> None:
    """Register the built-in plugins and those under `folders` (added to $SSLBENCH_PLUGINS, so that every job this
    process starts finds them too)."""
    for d in folders:
        if not Path(d).is_dir():
            raise ConfigError(f"--plugins {d}: not a folder (it should hold methods/*.py and/or protocols/*.py)")
    if folders:
        known = list(filter(None, os.environ.get("SSLBENCH_PLUGINS", "").split(os.pathsep)))
        os.environ["SSLBENCH_PLUGINS"] = os.pathsep.join(dict.fromkeys([*known, *(str(Path(d).resolve()) for d in folders)]))
    for package in ("methods", "protocols"):
        module = importlib.import_module(package)
        discover(package, module.__path__)  # folders added since the package was first imported


def print_list() -> None:
    for title, reg in (("methods", METHODS), ("protocols", PROTOCOLS), ("datasets", DATASETS), ("backbones", BACKBONES)):
        items = []
        for name in reg.names():
            version = reg.entry(name).meta.get("version")
            items.append(f"{name}@{version}" if version else name)
        print(f"{title}: {', '.join(items)}")
    from benchmark.store.importers import LAYOUTS

    print(f"checkpoint layouts: {', '.join(LAYOUTS.names())}")
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


def slurm_config(args: argparse.Namespace) -> SlurmConfig:
    extra = {}
    for item in args.slurm_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-set must be KEY=VALUE, got {item!r}")
        extra[key.strip().lstrip("-")] = value
    return SlurmConfig(partition=args.slurm_partition, account=args.slurm_account, qos=args.slurm_qos,
                       gpus_per_node=args.gpus_per_node, nodes=args.nodes, cpus_per_task=args.cpus_per_task,
                       mem_gb=args.mem_gb, timeout_min=args.timeout_min, array_parallelism=args.array_parallelism,
                       max_requeues=args.max_requeues, extra=extra)


def build_request(args: argparse.Namespace) -> Request:
    if args.executor == "slurm" and args.device is None:
        # the jobs' device, not this (login) machine's
        device = torch.device("cuda" if args.gpus_per_node > 0 else "cpu")
    else:
        device = device_of(args.device) if args.executor != "slurm" else torch.device(args.device)
    suite_name = args.suite or "default"
    suite: Suite = SUITES.get(suite_name)
    if args.suite is None and device.type == "cuda" and suite.on_gpu:
        suite = SUITES.get(suite.on_gpu)
    logger = {"pretrain": {"tensorboard": True}} if args.logger == "tensorboard" else {}  # before --config and --set
    user = C.merge(logger, *(C.load_yaml(f) for f in args.config), C.parse_set(args.sets))
    if args.data_root:
        user = C.merge(user, {"data": {"root": args.data_root}})
    checkpoints = tuple(parse_checkpoint(c, args) for c in args.checkpoint)
    unknown = sorted(set(args.trust_checkpoint) - {"*"} - {c.name for c in checkpoints})
    if unknown:
        raise ConfigError(f"--trust-checkpoint {', '.join(unknown)}: no --checkpoint has that NAME "
                          f"(given: {', '.join(c.name for c in checkpoints) or 'none'})")
    return Request(
        methods=_names(args.methods, () if checkpoints else suite.methods, "methods"),
        protocols=_names(args.protocols, suite.protocols, "protocols"),
        datasets=_names(args.datasets, suite.datasets, "datasets"),
        seeds=_seeds(args.seeds, suite.seeds),
        overrides=C.merge(suite.overrides, user),
        base_overrides=C.merge(suite.overrides),
        out=args.out,
        suite=suite.name,
        device=str(device),
        force=args.force,
        progress=not args.no_progress,
        checkpoints=checkpoints,
    )


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_benchmark.py export",
                                description="Convert any importable checkpoint to torchvision or Detectron2 layout.")
    p.add_argument("checkpoint", metavar="PATH[@ARCH]", help="checkpoint file (any layout in --list), optional architecture")
    p.add_argument("--format", required=True, choices=["torchvision", "detectron2"], help="output layout")
    p.add_argument("--to", required=True, metavar="FILE", help="output file (.pth for torchvision, .pkl for Detectron2)")
    p.add_argument("--checkpoint-layout", help="layout of the input when detection is ambiguous")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full pickle loading: only for files you trust")
    p.add_argument("--student", action="store_true", help="teacher/student checkpoints (DINO): export the student")
    return p


def export(argv: list[str]) -> int:
    """`run_benchmark.py export PATH[@ARCH] --format torchvision|detectron2 --to FILE`."""
    from benchmark.store.importers import export_detectron2, export_torchvision

    args = export_parser().parse_args(argv)
    try:
        ck = parse_checkpoint(f"export={args.checkpoint}", args)
        check_writable_file(args.to, "--to")  # before the import, not after it
        from benchmark.store.importers import import_encoder

        module, report = import_encoder(ck.path, ck.arch, ck.layout, trust=ck.trust, teacher=ck.teacher)
        print(report.summary())
        if args.format == "torchvision":
            export_torchvision(module, args.to)
        else:
            export_detectron2(module, args.to)
    except SSLBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} ({args.format} layout)")
    return 0


def _write_report(out: Path) -> str:
    """OUT/report.html after a run; a failure to write it is said in one line (the run's tables stand)."""
    from benchmark.run.report import write_report

    try:
        write_report([out], out / "report.html")
    except (SSLBenchError, OSError) as e:
        print(f"warning: report.html not written: {e}", file=sys.stderr)
        return ""
    return ", report.html"


class Terminated(BaseException):
    """SIGTERM (a scheduler's or `kill`'s), raised where the main thread is, as Ctrl-C raises KeyboardInterrupt."""


def _part(raw: str) -> tuple[int, int]:
    """'I/N' (1-based) -> (I - 1, N), or ConfigError."""
    i, _, n = raw.partition("/")
    try:
        part, parts = int(i), int(n)
    except ValueError:
        raise ConfigError(f"--extract-part {raw!r}: give I/N, e.g. 1/4") from None
    if not 1 <= part <= parts:
        raise ConfigError(f"--extract-part {raw!r}: I must be in 1..N")
    return part - 1, parts


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The command line. Ctrl-C and SIGTERM end it with one line and exit 130 / 143: records, checkpoints and tables
    are written atomically, so what finished is kept and the same command resumes."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except (KeyboardInterrupt, Terminated) as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{what}; finished cells and epoch checkpoints are kept: rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    rest = [a for a in argv if a not in ("--no-progress", "-v", "--verbose")]  # global flags allowed before it
    if rest[:1] == ["export"]:
        return export(rest[1:])
    if rest[:1] == ["throughput"]:
        from benchmark.run.throughput import main as throughput_main

        return throughput_main(rest[1:])
    if rest[:1] == ["report"]:
        from benchmark.run.report import main as report_main

        return report_main(rest[1:])
    if rest[:1] == ["status"]:
        from benchmark.run.status import main as status_main

        return status_main(rest[1:])
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_plugins(args.plugins)
        if args.list:
            print_list()
            return 0
        req = build_request(args)
        p = plan(req)
        for report in p.imports:
            print(report)
        out = Path(req.out)
        check_writable_dir(out, "--out")  # after planning (a bad request leaves nothing), before any work
        if args.extract_part:
            part, parts = _part(args.extract_part)
            n = extract_part(p, part, parts)
            print(f"{n} feature shards extracted (part {part + 1} of {parts}); run the command without --extract-part when every part is done")
            return 0
        print(f"sslbench: suite {req.suite}, {len(req.methods)} methods x {len(req.protocols)} protocols x "
              f"{len(req.datasets)} datasets x {len(req.seeds)} seeds on {describe(torch.device(req.device))} -> {out}/")
        t0 = time.perf_counter()
        executor = make_executor(args.executor, out, slurm_config(args))
        summary = run(p, executor, out, force=req.force)
    except TablesNotWritten as e:  # the work ran: not a bad request
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SSLBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (out / "leaderboard.md").is_file() and summary.done == 0 and not summary.failed:
        return 0  # a torchrun follower process: rank 0 reports
    print()
    print((out / "leaderboard.md").read_text())
    report = _write_report(out) if not args.no_report else ""
    print(f"{summary.done} cells done, {summary.skipped} reused, {len(summary.failed)} failed in {time.perf_counter() - t0:.0f}s; "
          f"tables in {out}/ (results.csv, leaderboard.csv, leaderboard.md{report})")
    for line in summary.not_applicable:
        print(f"skipped (does not apply): {line}")
    if summary.diverged:
        print(f"diverged (no metrics): {', '.join(summary.diverged)}")
    if summary.stopped:
        print(f"stopped early (pretrain.stop_below): {', '.join(summary.stopped)} (reasons in {out}/failures.csv)")
    if summary.failed:
        print(f"failed: {', '.join(summary.failed)} (details in {out}/failures.csv and {out}/records/)", file=sys.stderr)
        return 1
    return 0

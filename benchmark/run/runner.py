"""Plan a grid of cells and run it through an executor. Knows no particular method or protocol.

A pretraining task is (method, dataset, seed) with its resolved config; an evaluation cell adds
(protocol@version). Tasks are plain picklable objects and the task functions read and write only
files under `out`, so any executor (local now, SLURM later) can run them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmark import config as C
from benchmark.data.datasets import load_splits, save_split_file
from benchmark.device import describe
from benchmark.errors import CheckpointIntegrityError, ConfigError, NotApplicable, SSLBenchError
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.evaluate.protocol import EvalContext
from benchmark.registry import BACKBONES, DATASETS, METHODS, PROTOCOLS
from benchmark.run.executor import Executor, Job, current_job_id
from benchmark.run.lock import holding
from benchmark.store.checkpoints import sha256_file, verify
from benchmark.store.io import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temps
from benchmark.store.predictions import Predictions, samples_path, save_samples
from benchmark.store.provenance import git_info, now, versions
from benchmark.store.results import Row, rebuild, row_dict, write_record
from benchmark.train.distributed import launched_processes, process_group, rank, world_size
from benchmark.train.method import Hooks
from benchmark.train.pretrain import build_method, pretrain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSpec:
    """Someone's checkpoint evaluated as a leaderboard row (`--checkpoint NAME=PATH[@ARCH]`)."""

    name: str  # the row's name in the `method` column
    path: str
    arch: str | None = None  # None: inferred from the tensor shapes
    layout: str | None = None  # None: detected (see `--list`)
    trust: bool = False  # allow a full pickle load (only for files you trust)
    teacher: bool = True  # DINO-style files: evaluate the teacher


@dataclass(frozen=True)
class Request:
    """What the user asked for, before resolution."""

    methods: tuple[str, ...]
    protocols: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: dict[str, dict[str, Any]]  # suite < YAML < --set, already merged
    out: str
    suite: str
    device: str = "cpu"
    force: bool = False
    progress: bool = True
    checkpoints: tuple[CheckpointSpec, ...] = ()
    # what the suite sets (a part of `overrides`): a result's `variant` names what differs from it, so that a row trained
    # or evaluated under `--set knn.k=5` reads `simclr [knn.k=5]` on the leaderboard. None: `overrides` (no variants).
    base_overrides: dict[str, dict[str, Any]] | None = None

    @property
    def base(self) -> dict[str, dict[str, Any]]:
        return self.overrides if self.base_overrides is None else self.base_overrides


@dataclass(frozen=True)
class PretrainTask:
    method: str
    dataset: str
    seed: int
    data: C.DataConfig
    pretrain: C.PretrainConfig
    method_cfg: Any
    pretrain_hash: str
    run_dir: str
    out: str
    suite: str
    device: str
    progress: bool
    checkpoint: CheckpointSpec | None = None  # set: import this file instead of pretraining
    checkpoint_sha256: str | None = None  # of `checkpoint.path` when the grid was planned
    setting: str = ""  # hash of the resolved pretraining without the seed: the seeds of one setting share it
    variant: str = ""  # what the pretraining changes from the suite, e.g. "pretrain.epochs=0"

    @property
    def label(self) -> str:
        return f"{self.method}/{self.dataset}/seed{self.seed}"


@dataclass(frozen=True)
class EvalTask:
    pretrain: PretrainTask
    protocol: str
    version: str
    protocol_cfg: Any
    eval_cfg: C.EvalConfig
    config_hash: str
    record_path: str
    setting: str = ""  # hash of the cell without the seed: a leaderboard cell averages only seeds of one setting
    variant: str = ""  # what the protocol's config changes from the suite ("knn.k=5"): its own leaderboard column

    @property
    def label(self) -> str:
        return f"{self.pretrain.label} {self.protocol}@{self.version}"


@dataclass(frozen=True)
class Plan:
    pretrain: list[PretrainTask]
    evals: list[EvalTask]
    imports: list[str] = dataclasses.field(default_factory=list)  # one report per imported checkpoint


# --------------------------------------------------------------------------- planning


def _check_sections(overrides: dict[str, dict[str, Any]]) -> None:
    valid = set(C.CORE_SECTIONS) | set(METHODS.names()) | set(PROTOCOLS.names()) | {f"pretrain@{m}" for m in METHODS.names()}
    for section in overrides:
        if section not in valid:
            import difflib

            close = difflib.get_close_matches(section, sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config section {section!r}{hint} valid: {', '.join(sorted(valid))}")


def _fill_from_data(cfg: Any, num_classes: int, num_samples: int | None = None) -> Any:
    """Plugin config fields `num_classes` / `num_samples` left at None take the dataset's class count and
    training-set size (memory banks and pseudo-labels are sized by the latter)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if "num_classes" in names and cfg.num_classes is None:
        cfg = dataclasses.replace(cfg, num_classes=num_classes)
    if "num_samples" in names and cfg.num_samples is None and num_samples is not None:
        cfg = dataclasses.replace(cfg, num_samples=num_samples)
    return cfg


def _show(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _variant(sections: dict[str, tuple[Any, Any]]) -> str:
    """`section.key=value, ...` for each hashed field whose resolved value differs from the base's (the suite's)."""
    parts = []
    for name, (cfg, base) in sections.items():
        got, ref = C.to_dict(cfg, semantic_only=True), C.to_dict(base, semantic_only=True)
        parts += [f"{name}.{k}={_show(v)}" for k, v in sorted(got.items()) if k not in ref or ref[k] != v]
    return ", ".join(parts)


def _pretrain_cfgs(method: str, ov: dict[str, dict[str, Any]], splits: Any, quiet: bool = False) -> tuple[C.PretrainConfig, Any]:
    """The resolved pretraining and method configs of `method` under the override layers `ov` (`quiet`: the base
    a variant is named against, resolved a second time: its substitutions are not told again)."""
    entry = METHODS.entry(method)
    # a method's `pretrain` defaults yield to the suite and the user (`pretrain`, then the method's own
    # `pretrain@<method>` section); its `pretrain_fixed` settings do not
    pre_cfg = C.apply_overrides(C.PretrainConfig(), {**entry.meta.get("pretrain", {}), **ov.get("pretrain", {}),
                                                     **ov.get(f"pretrain@{method}", {}),
                                                     **entry.meta.get("pretrain_fixed", {})}, "pretrain")
    allowed = entry.meta.get("backbones")  # a method that only works on some backbones (MAE: ViTs)
    if allowed and pre_cfg.backbone not in allowed:
        if not quiet:
            log.warning("%s needs one of the backbones %s; using %s instead of %s", method, ", ".join(allowed), allowed[0],
                        pre_cfg.backbone)
        pre_cfg = dataclasses.replace(pre_cfg, backbone=allowed[0])
    BACKBONES.entry(pre_cfg.backbone)  # unknown: one line now, not a traceback inside the job
    m_cfg = _fill_from_data(C.apply_overrides(METHODS.default_config(method), ov.get(method, {}), method), splits.num_classes,
                            len(splits.train))
    return pre_cfg, m_cfg


def plan(req: Request) -> Plan:
    """Resolve and validate everything (names, configs, datasets) before any work starts."""
    for names, reg in ((req.methods, METHODS), (req.protocols, PROTOCOLS), (req.datasets, DATASETS)):
        for name in names:
            reg.entry(name)
    _check_sections(req.overrides)
    ov = req.overrides
    base = req.base
    data_cfg = C.apply_overrides(C.DataConfig(), ov.get("data", {}), "data")
    base_data = C.apply_overrides(C.DataConfig(), base.get("data", {}), "data")
    eval_cfg = C.apply_overrides(C.EvalConfig(), ov.get("eval", {}), "eval")
    for name in set(ov) & set(METHODS.names()) | set(ov) & set(PROTOCOLS.names()):  # typos fail even off-grid
        reg = METHODS if name in METHODS else PROTOCOLS
        C.apply_overrides(reg.default_config(name), ov[name], name)
    out = Path(req.out)
    pre_tasks, eval_tasks = [], []
    imported = _check_checkpoints(req)  # every file is loaded and checked now, before any work starts
    for dataset in req.datasets:
        splits = load_splits(dataset, data_cfg)  # fails now, not inside a job, if the data is missing
        for ck, report in zip(req.checkpoints, imported):
            pre_cfg = C.PretrainConfig(backbone=report.arch.split(" ")[0], epochs=0)
            # an imported encoder does not depend on the seed: one hash, one run folder for every seed
            ph = C.config_hash({"checkpoint_sha256": report.sha256, "arch": report.arch, "layout": report.layout,
                                "teacher": ck.teacher, "data": data_cfg, "dataset": dataset, "fingerprint": splits.fingerprint})
            run_dir = out / "runs" / dataset / ck.name / f"checkpoint-{ph}"
            data_variant = _variant({"data": (data_cfg, base_data)})
            for seed in req.seeds:
                pt = PretrainTask(ck.name, dataset, seed, data_cfg, pre_cfg, None, ph, str(run_dir), str(out), req.suite,
                                  req.device, req.progress, ck, report.sha256, setting=ph, variant=data_variant)
                pre_tasks.append(pt)
                eval_tasks += _eval_tasks(req, pt, splits, eval_cfg)
        for method in req.methods:
            pre_cfg, m_cfg = _pretrain_cfgs(method, ov, splits)
            if pre_cfg.crops == "worker" and not splits.storage.startswith("stream"):
                raise ConfigError(f"pretrain.crops=worker crops views from the full decoded images of a streamed set; {dataset!r} "
                                  f"is held in memory ({splits.storage}): add --set data.storage=stream (a file-based dataset) "
                                  "or use pretrain.crops=batch")
            base_pre, base_m = _pretrain_cfgs(method, base, splits, quiet=True)
            identity = {"method": method, "method_cfg": m_cfg, "pretrain": pre_cfg, "data": data_cfg, "dataset": dataset,
                        "fingerprint": splits.fingerprint}
            variant = _variant({"data": (data_cfg, base_data), "pretrain": (pre_cfg, base_pre), method: (m_cfg, base_m)})
            for seed in req.seeds:
                ph = C.config_hash({**identity, "seed": seed})
                run_dir = out / "runs" / dataset / method / f"seed{seed}-{ph}"
                pt = PretrainTask(method, dataset, seed, data_cfg, pre_cfg, m_cfg, ph, str(run_dir), str(out), req.suite, req.device,
                                  req.progress, setting=C.config_hash(identity), variant=variant)
                pre_tasks.append(pt)
                eval_tasks += _eval_tasks(req, pt, splits, eval_cfg)
    return Plan(pre_tasks, eval_tasks, [report.summary() for report in imported])


def _eval_tasks(req: Request, pt: PretrainTask, splits: Any, eval_cfg: C.EvalConfig) -> list[EvalTask]:
    """One evaluation cell per protocol for the encoder of `pt`."""
    tasks = []
    for protocol in req.protocols:
        pentry = PROTOCOLS.entry(protocol)
        if splits.multilabel and not pentry.meta.get("multilabel", False):
            able = ", ".join(n for n in PROTOCOLS.names() if PROTOCOLS.entry(n).meta.get("multilabel", False))
            raise ConfigError(f"dataset {pt.dataset!r} is multi-label; protocol {protocol!r} needs one label per image "
                              f"(multi-label protocols: {able or 'none'})")
        version = PROTOCOLS.version(protocol)
        p_cfg, base_cfg = (_fill_from_data(C.apply_overrides(PROTOCOLS.default_config(protocol), layers.get(protocol, {}), protocol),
                                           splits.num_classes) for layers in (req.overrides, req.base))
        # a cell is (method or checkpoint, protocol@version, dataset, seed, resolved config, checkpoint sha256)
        ch = C.config_hash({"pretrain_hash": pt.pretrain_hash, "protocol": protocol, "version": version, "cfg": p_cfg})
        setting = C.config_hash({"pretrain_setting": pt.setting, "protocol": protocol, "version": version, "cfg": p_cfg})
        rec = Path(pt.out) / "records" / pt.dataset / pt.method / f"{protocol}@{version}" / f"seed{pt.seed}-{ch}.json"
        tasks.append(EvalTask(pt, protocol, version, p_cfg, eval_cfg, ch, str(rec), setting, _variant({protocol: (p_cfg, base_cfg)})))
    return tasks


def _check_checkpoints(req: Request) -> list[Any]:
    """Import every `--checkpoint` once (layout, architecture, every key checked); names must be unique."""
    from benchmark.store.importers import import_encoder

    names = [c.name for c in req.checkpoints]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(req.methods)))
    if clash:
        raise ConfigError(f"--checkpoint name(s) {', '.join(clash)} used twice or also given in --methods; pick another NAME")
    return [import_encoder(ck.path, ck.arch, ck.layout, trust=ck.trust, teacher=ck.teacher)[1] for ck in req.checkpoints]


# --------------------------------------------------------------------------- task functions


def _sections(task: PretrainTask) -> dict[str, Any]:
    if task.checkpoint is not None:
        return {"data": C.to_dict(task.data), "checkpoint": {**dataclasses.asdict(task.checkpoint), "sha256": task.checkpoint_sha256}}
    return {"data": C.to_dict(task.data), "pretrain": C.to_dict(task.pretrain), task.method: C.to_dict(task.method_cfg)}


# pretrainings that end finished but leave no encoder to evaluate: their cells get one NaN row with the status
NO_ENCODER = ("diverged", "stopped")


def run_pretrain(task: PretrainTask) -> dict[str, Any]:
    """Pretrain (or resume, or reuse) one method; writes encoder weights and `pretrain.json`."""
    run_dir = Path(task.run_dir)
    meta_path = run_dir / "pretrain.json"
    if task.checkpoint is not None:
        return _record_import(task, meta_path)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["status"] in NO_ENCODER or _encoder_ok(run_dir):
            return dict(meta)
    # started as several processes (torchrun, or one SLURM task per GPU): they train together, rank 0 writes
    with process_group(torch.device(task.device)) as device:
        return _pretrain_here(task, device)


def _pretrain_here(task: PretrainTask, device: torch.device) -> dict[str, Any]:
    run_dir = Path(task.run_dir)
    meta_path = run_dir / "pretrain.json"
    lead = rank() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    attempts = 1 + int((run_dir / "attempts").read_text()) if (run_dir / "attempts").is_file() else 1
    if lead:
        atomic_write_text(run_dir / "attempts", str(attempts))
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(_sections(task), sort_keys=True))
    splits = load_splits(task.dataset, task.data)
    if lead:
        save_split_file(splits, Path(task.out) / "splits" / f"{task.dataset}-{splits.fingerprint}.json")
    t0 = time.perf_counter()
    sha, dirty = git_info()  # the code that trains (evaluation rows record theirs too: an encoder may be reused)
    model = build_method(METHODS.get(task.method), task.method_cfg, task.pretrain, splits, task.seed)
    trainable = Hooks.of(model).trainable and task.pretrain.epochs > 0
    cfg = task.pretrain if trainable else dataclasses.replace(task.pretrain, epochs=0)
    outcome = pretrain(model, splits, cfg, task.seed, run_dir / "checkpoints", device, task.progress, desc=task.label,
                       tensorboard_dir=run_dir / "tensorboard")
    if not lead:
        return {"status": outcome.status, "rank": rank()}
    meta = {"status": outcome.status, "method": task.method, "dataset": task.dataset, "seed": task.seed,
            "pretrain_hash": task.pretrain_hash, "attempts": attempts, "steps": outcome.steps,
            "diverged_at": outcome.diverged_at, "diverged_because": outcome.reason if outcome.status != "stopped" else "",
            "stopped_because": outcome.reason if outcome.status == "stopped" else "", "last_finite_loss": outcome.last_finite_loss,
            "history": outcome.history, "wall_s": time.perf_counter() - t0, "finished_at": now(),
            "device": describe(device), "dim": int(getattr(outcome.encoder, "dim", 0)), "processes": world_size(),
            "git_sha": sha, "git_dirty": dirty, "versions": versions()}
    if outcome.status not in NO_ENCODER:
        _save_encoder(outcome.encoder, run_dir / "encoder.safetensors")
        meta["encoder_sha256"] = sha256_file(run_dir / "encoder.safetensors")
    atomic_write_json(meta_path, meta)
    return meta


def _record_import(task: PretrainTask, meta_path: Path) -> dict[str, Any]:
    """A checkpoint is not trained: import it (checked) and record the report; evaluation re-imports it."""
    from benchmark.store.importers import import_encoder

    ck = task.checkpoint
    if ck is None:
        raise TypeError(f"{task.label} is a pretraining task, not a checkpoint import")
    t0 = time.perf_counter()
    _, report = import_encoder(ck.path, ck.arch, ck.layout, trust=ck.trust, teacher=ck.teacher)
    if report.sha256 != task.checkpoint_sha256:
        raise CheckpointIntegrityError(f"{ck.path} changed since the grid was planned: sha256 {report.sha256}, "
                                       f"planned {task.checkpoint_sha256}; rerun the command")
    meta = {"status": "ok", "method": task.method, "dataset": task.dataset, "seed": task.seed, "pretrain_hash": task.pretrain_hash,
            "attempts": 1, "steps": 0, "history": [], "wall_s": time.perf_counter() - t0, "finished_at": now(),
            "checkpoint": ck.path, "encoder_sha256": report.sha256, "import": dataclasses.asdict(report), "dim": report.dim}
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)
    return meta


def _save_encoder(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:  # the sidecar first: an interrupted save never leaves an unverifiable encoder
        save_file(tensors, str(tmp))
        atomic_write_text(path.with_name(path.name + ".sha256"), f"{sha256_file(tmp)}  {path.name}\n")


def _encoder_ok(run_dir: Path) -> bool:
    try:
        verify(run_dir / "encoder.safetensors")
        return True
    except CheckpointIntegrityError:
        return False


def _encoder_ready(task: PretrainTask) -> bool:
    """The pretraining job left what evaluation needs: `pretrain.json` and (unless diverged, stopped or an imported
    checkpoint) a verified encoder file."""
    meta_path = Path(task.run_dir) / "pretrain.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return bool(task.checkpoint is not None or meta.get("status") in NO_ENCODER or _encoder_ok(Path(task.run_dir)))


def _in_channels(module: torch.nn.Module) -> int | None:
    conv = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def adapt_channels(splits: Any, module: torch.nn.Module) -> Any:
    """The dataset with the channel count an imported encoder expects (grey <-> RGB)."""
    from benchmark.evaluate.protocol import to_channels

    want = _in_channels(module) or splits.channels
    if want == splits.channels:
        return splits
    tr, va, te = (to_channels(x, want) for x in (splits.train, splits.val, splits.test))
    mean, std = (splits.mean * want, splits.std * want) if splits.channels == 1 else ((sum(splits.mean) / 3,), (sum(splits.std) / 3,))
    return dataclasses.replace(splits, train=tr, val=va, test=te, mean=mean, std=std, fingerprint=f"{splits.fingerprint}-c{want}")


def load_encoder(task: PretrainTask, splits: Any, device: torch.device, eval_cfg: C.EvalConfig) -> FrozenEncoder:
    """Rebuild the method's encoder and load the verified encoder weights (strict: every key must match)."""
    from safetensors.torch import load_file

    from benchmark.backbones import build_backbone

    cache = Path(task.run_dir) / "features" if eval_cfg.cache else None
    if task.checkpoint is not None:  # re-imported (checked again) on the evaluation's machine
        from benchmark.store.importers import import_encoder

        ck = task.checkpoint
        mod, report = import_encoder(ck.path, ck.arch, ck.layout, trust=ck.trust, teacher=ck.teacher)
        if report.sha256 != task.checkpoint_sha256:
            raise CheckpointIntegrityError(f"{ck.path} changed since the grid was planned: sha256 {report.sha256}, "
                                           f"planned {task.checkpoint_sha256}; rerun the command")
        adapted = adapt_channels(splits, mod)  # the file's normalisation, else the dataset's
        mean, std = (tuple(report.mean), tuple(report.std or ())) if report.mean is not None else (adapted.mean, adapted.std)
        return FrozenEncoder(mod, report.dim, mean, std, key=report.sha256[:16], device=device, cache_dir=cache,
                             batch_size=eval_cfg.batch_size, feature_dtype=eval_cfg.dtype_for(bool(splits.transform)),
                             shard_rows=eval_cfg.shard_rows)

    path = Path(task.run_dir) / "encoder.safetensors"
    digest = verify(path)
    # what the method's `encoder()` returns: the backbone, or e.g. CMC's two halves
    if task.method_cfg is None:
        module = build_backbone(task.pretrain, splits.channels, splits.image_size)
    else:
        module = build_method(METHODS.get(task.method), task.method_cfg, task.pretrain, splits, task.seed).encoder()  # type: ignore[operator]
    module.load_state_dict(load_file(str(path)), strict=True)
    return FrozenEncoder(module, int(getattr(module, "dim")), splits.mean, splits.std, key=digest[:16], device=device,
                         cache_dir=cache, batch_size=eval_cfg.batch_size, feature_dtype=eval_cfg.dtype_for(bool(splits.transform)),
                         shard_rows=eval_cfg.shard_rows)


def evaluation_inputs(pt: PretrainTask, eval_cfg: C.EvalConfig, device: torch.device) -> tuple[Any, FrozenEncoder, Any]:
    """(the dataset's splits, the frozen encoder, the splits as its protocols see them: an imported checkpoint's
    channel count): what an evaluation cell reads, and so what `extract_part` extracts for it."""
    data = load_splits(pt.dataset, pt.data)
    encoder = load_encoder(pt, data, device, eval_cfg)
    return data, encoder, adapt_channels(data, encoder.module) if pt.checkpoint is not None else data


def _state_fingerprint(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN at the same places counting as equal (`torch.equal(nan, nan)` is False)."""
    if a.is_floating_point() and b.is_floating_point():
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def run_eval(task: EvalTask) -> dict[str, Any]:
    """Evaluate one cell and write its record atomically. Returns the record."""
    pt = task.pretrain
    started, t0 = now(), time.perf_counter()
    meta = json.loads((Path(pt.run_dir) / "pretrain.json").read_text())
    sha, dirty = git_info()
    v = versions()
    device = torch.device(pt.device)
    prov: dict[str, Any] = {
        "run_id": uuid.uuid4().hex[:12], "method": pt.method, "protocol": task.protocol, "protocol_version": task.version,
        "dataset": pt.dataset, "seed": pt.seed, "suite": pt.suite, "backbone": pt.pretrain.backbone,
        "config_hash": task.config_hash, "setting": task.setting, "variant": pt.variant, "protocol_variant": task.variant,
        "pretrain_hash": pt.pretrain_hash, "pretrain_setting": pt.setting,
        "git_sha": sha, "git_dirty": dirty,
        # the pretraining's code (absent for encoders trained before it was recorded, and for imported checkpoints)
        "pretrain_git_sha": meta.get("git_sha"), "pretrain_git_dirty": meta.get("git_dirty"),
        "torch": v["torch"], "python": v["python"], "device": describe(device), "attempts": meta.get("attempts"),
        "started_at": started, "status": meta["status"], "flags": "collapsed" if meta["status"] == "collapsed" else "",
        "checkpoint": pt.checkpoint.path if pt.checkpoint else str(Path(pt.run_dir) / "encoder.safetensors"),
        "checkpoint_sha256": meta.get("encoder_sha256"), "job_id": current_job_id(),
    }
    rows: list[Row]
    if meta["status"] == "diverged":
        rows = [Row("diverged", float("nan"), extra={"step": meta.get("diverged_at"), "because": meta.get("diverged_because") or "loss not finite"})]
    elif meta["status"] == "stopped":
        rows = [Row("stopped", float("nan"), extra={"because": meta.get("stopped_because") or "pretrain.stop_below"})]
    else:
        data, encoder, splits = evaluation_inputs(pt, task.eval_cfg, device)
        prov["dataset_fingerprint"] = data.fingerprint
        prov["data_storage"], prov["data_transform"] = data.storage, data.transform or None
        prov["n_train"] = len(data.train) + len(data.val)
        prov["feature_dtype"] = encoder.feature_dtype
        before = _state_fingerprint(encoder.module)
        ctx = EvalContext(out=Path(pt.out), progress=pt.progress, device=device)
        rows = PROTOCOLS.get(task.protocol)(encoder, splits, task.protocol_cfg, pt.seed, ctx)
        after = encoder.module.state_dict()
        changed = [k for k, t in before.items() if not _same(t, after[k])]
        if changed:
            raise RuntimeError(f"protocol {task.protocol} changed the frozen encoder ({', '.join(changed[:3])})")
        prov["effective_batch_size"] = encoder.effective_batch_size
    prov["finished_at"], prov["wall_s"] = now(), round(time.perf_counter() - t0, 3)
    record = {"status": prov["status"], "config": {**_sections(pt), task.protocol: C.to_dict(task.protocol_cfg)},
              "versions": v, "rows": [row_dict(r, prov) for r in rows]}
    record.update(_write_samples(Path(task.record_path), rows))  # before the record: a record never names a missing file
    write_record(Path(task.record_path), record)
    Path(task.record_path).with_suffix(".failed.json").unlink(missing_ok=True)
    return record


def _write_samples(record_path: Path, rows: list[Row]) -> dict[str, Any]:
    """The rows' per-sample predictions (sets shared by several rows written once) as `<record>.samples.npz`; the
    record's `samples` entry naming the file and each metric's set ({} when no row has any)."""
    sets: dict[int, tuple[str, Predictions]] = {}
    metrics = {}
    for r in rows:
        if r.samples is not None:
            name, _ = sets.setdefault(id(r.samples), (f"s{len(sets)}", r.samples))
            metrics[r.metric] = name
    path = samples_path(record_path)
    if sets:
        try:
            save_samples(path, dict(sets.values()))
            return {"samples": {"file": path.name, "metrics": metrics}}
        except OSError as e:  # the numbers still count; only the paired tests of this cell are lost
            log.warning("per-sample predictions not written to %s (%s); the record keeps its rows", path, e)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)  # an earlier attempt's file must not pass for this one's
    return {}


def failed_record(task: EvalTask, error: BaseException, job_id: str, log: str = "") -> dict[str, Any]:
    """A record for a cell whose job raised: listed in failures.csv, never in the leaderboard."""
    pt = task.pretrain
    status = "skipped" if isinstance(error, NotApplicable) else "failed"
    name = getattr(error, "remote_type", type(error).__name__)  # a job's error: what the task raised
    msg = (str(error) if status == "skipped" else f"{name}: {error}").splitlines()[0][:300]
    prov = {"run_id": job_id, "method": pt.method, "protocol": task.protocol, "protocol_version": task.version,
            "dataset": pt.dataset, "seed": pt.seed, "suite": pt.suite, "backbone": pt.pretrain.backbone,
            "config_hash": task.config_hash, "setting": task.setting, "variant": pt.variant, "protocol_variant": task.variant,
            "pretrain_hash": pt.pretrain_hash, "pretrain_setting": pt.setting,
            "status": status, "flags": msg,
            "finished_at": now(), "job_id": job_id, "log": log}
    record = {"status": status, "error": (getattr(error, "text", "") or "".join(traceback.format_exception(error)))[-4000:],
              "rows": [row_dict(Row(status, float("nan")), prov)]}
    # a skipped cell is finished (a rerun does not retry it); a failed one is retried
    write_record(Path(task.record_path) if status == "skipped" else Path(task.record_path).with_suffix(".failed.json"), record)
    return record


# --------------------------------------------------------------------------- the grid


class TablesNotWritten(SSLBenchError):
    """The grid ran but results.csv / the leaderboard could not be written (a full or vanished disk)."""


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    diverged: list[str] = dataclasses.field(default_factory=list)
    stopped: list[str] = dataclasses.field(default_factory=list)  # pretrain.stop_below ended their pretraining
    not_applicable: list[str] = dataclasses.field(default_factory=list)  # "label: reason"


def _finished(task: EvalTask) -> bool:
    """The cell has a valid record: a JSON object with a final status and at least one row, every row of this cell's
    configuration. Anything else (missing, unreadable, edited down to `{"status": "ok"}`, a list) is rerun."""
    p = Path(task.record_path)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or rec.get("status") not in ("ok", "collapsed", "diverged", "stopped", "skipped"):
        return False
    rows = rec.get("rows")
    return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and r.get("config_hash") == task.config_hash
                                                         for r in rows)


def _cell_row(task: EvalTask) -> dict[str, Any]:
    pt = task.pretrain
    return {"cell": task.label, "method": pt.method, "dataset": pt.dataset, "seed": pt.seed, "protocol": f"{task.protocol}@{task.version}",
            "record": task.record_path, "run_dir": pt.run_dir}


def _note_jobs(out: Path, jobs: dict[str, dict[str, Any]]) -> None:
    """Add submitted jobs to `out/jobs.json` (label -> job id, executor, log, time) for `run_benchmark.py status`."""
    path = out / "jobs.json"
    ledger = json.loads(path.read_text()) if path.is_file() else {}
    ledger.update(jobs)
    atomic_write_json(path, ledger)


def _job_note(job: Job[Any], executor: Executor, kind: str) -> dict[str, Any]:
    return {"job_id": job.job_id, "executor": executor.name, "log": job.log, "kind": kind, "submitted_at": now()}


Outcome = tuple[EvalTask, "Job[Any] | None", "BaseException | None"]  # a cell, its evaluation job, or why it has none


def extract_part(p: Plan, part: int, parts: int, echo: Any = print) -> int:
    """Extract part `part` of `parts` of the feature stores the plan's cells read (shards k ≡ part mod parts), for
    every encoder that exists already (imported checkpoints, finished pretrainings). `parts` of these run at once
    (SLURM array tasks, one per GPU); the grid's own command then finds the stores complete. Holds no --out lock:
    each part writes only its own shard files, atomically. Returns the number of shards written."""
    from benchmark.evaluate.encoder import extract_shards

    done: set[tuple[str, str]] = set()
    written = 0
    for task in p.evals:
        pt = task.pretrain
        if (pt.run_dir, pt.dataset) in done:
            continue
        done.add((pt.run_dir, pt.dataset))
        if not task.eval_cfg.cache:
            raise ConfigError("--extract-part fills the feature store: it needs eval.cache=true")
        if pt.checkpoint is None and not (Path(pt.run_dir) / "encoder.safetensors").is_file():
            echo(f"{pt.label}: not pretrained yet, nothing to extract (run the grid's pretraining first)")
            continue
        _, encoder, splits = evaluation_inputs(pt, task.eval_cfg, torch.device(pt.device))
        n = sum(extract_shards(encoder, getattr(splits, s), f"{splits.fingerprint}-{s}", part, parts) for s in ("train", "val", "test"))
        echo(f"{pt.label}: {n} feature shards extracted (part {part + 1} of {parts})")
        written += n
    return written


def run(p: Plan, executor: Executor, out: Path, force: bool = False, echo: Any = print, poll_s: float = 2.0) -> Summary:
    """Run the grid: every pretraining task that a missing cell needs (one job array), and, as soon as an
    encoder is ready, its evaluation cells (one array per encoder). Collects every job on its own (a failed or
    killed job costs only its cells); a job that ends without a valid record counts as failed. Rebuilds the tables."""
    follower = launched_processes() > 1 and os.environ.get("RANK", "0") != "0"  # torchrun: rank 0 holds `out`
    with contextlib.nullcontext() if follower else holding(out):
        return _run(p, executor, out, force, echo, poll_s)


def _run(p: Plan, executor: Executor, out: Path, force: bool, echo: Any, poll_s: float) -> Summary:
    summary = Summary()
    cells_of = _cells_to_run(p, out, force, summary, echo)
    pre_tasks = [t for t in p.pretrain if t.run_dir in cells_of]
    if force:
        for pt in pre_tasks:
            if Path(pt.run_dir).exists():
                shutil.rmtree(pt.run_dir)
    pre_jobs = executor.map(run_pretrain, pre_tasks, kind="pretrain")
    if launched_processes() > 1 and os.environ.get("RANK", "0") != "0":
        # a torchrun follower: it only helps rank 0 pretrain; rank 0 evaluates and writes the tables
        for job in pre_jobs:
            job.exception()
        return summary
    if executor.name != "local" and pre_jobs:
        _note_jobs(out, {pt.label: _job_note(j, executor, "pretrain") for pt, j in zip(pre_tasks, pre_jobs)})
        echo(f"submitted {len(pre_jobs)} pretraining jobs ({executor.name}: {', '.join(j.job_id for j in pre_jobs)}); "
             f"logs under {Path(pre_jobs[0].log).parent.parent}")
    outcomes = _await_pretraining(list(zip(pre_tasks, pre_jobs)), cells_of, executor, out, echo, poll_s)
    for i, outcome in enumerate(outcomes, 1):
        _collect(outcome, f"[{i}/{len(outcomes)}]", summary, echo)
    try:
        rebuild(out)
    except OSError as e:
        raise TablesNotWritten(f"the tables in {out} could not be written ({e.strerror or e}); free space and rerun the same "
                               f"command: {summary.done} finished cells are kept and only the rest reruns") from None
    return summary


def _cells_to_run(p: Plan, out: Path, force: bool, summary: Summary, echo: Any) -> dict[str, list[EvalTask]]:
    """Write the grid for `status`; the cells without a finished record (all with `force`), by encoder run folder."""
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out)  # this command holds `out`: leftovers of a killed write are nobody's
    if stale:
        echo(f"removed {stale} temporary files of interrupted writes")
    atomic_write_json(out / "grid.json", {"cells": [_cell_row(t) for t in p.evals]})  # what `status` reports on
    todo = [t for t in p.evals if force or not _finished(t)]
    summary.skipped = len(p.evals) - len(todo)
    if summary.skipped:
        echo(f"{summary.skipped} of {len(p.evals)} cells already have results (use --force to rerun them)")
    cells_of: dict[str, list[EvalTask]] = {}
    for t in todo:
        cells_of.setdefault(t.pretrain.run_dir, []).append(t)
    return cells_of


def _await_pretraining(waiting: list[tuple[PretrainTask, Job[Any]]], cells_of: dict[str, list[EvalTask]], executor: Executor,
                       out: Path, echo: Any, poll_s: float) -> list[Outcome]:
    """Poll the pretraining jobs; as each ends, submit its encoder's evaluation cells (or record why they cannot run)."""
    inline = executor.name == "local"  # tasks run here, one by one: announce each before it starts
    total, n_done = len(waiting), 0
    outcomes: list[Outcome] = []
    while waiting:
        still = []
        for pt, job in waiting:
            what = f"import {pt.checkpoint.path}" if pt.checkpoint else f"pretrain {pt.label} ({pt.pretrain.backbone}, {pt.pretrain.epochs} epochs)"
            if inline:
                echo(f"[{n_done + 1}/{total}] {what}")
            if not job.done():
                still.append((pt, job))
                continue
            n_done += 1
            head = "   " if inline else f"[{n_done}/{total}] {what} (job {job.job_id}):"
            outcomes += _on_pretrained(pt, job, cells_of[pt.run_dir], executor, out, head, echo)
        waiting = still
        if waiting:
            time.sleep(poll_s)
    return outcomes


def _on_pretrained(pt: PretrainTask, job: Job[Any], cells: list[EvalTask], executor: Executor, out: Path, head: str,
                   echo: Any) -> list[Outcome]:
    """One finished pretraining job: report it, then submit its cells, or pass its error on to each of them."""
    err = job.exception()
    if err is None and not _encoder_ready(pt):
        err = RuntimeError(f"job {job.job_id} ended without a valid encoder in {pt.run_dir} (log: {job.log or '-'})")
    if err is not None:
        name = getattr(err, "remote_type", type(err).__name__)
        echo(f"{head} {'skipped' if isinstance(err, NotApplicable) else 'failed'}: {name}: {str(err).splitlines()[0] if str(err) else ''}")
        return [(t, None, err) for t in cells]
    meta = job.result()
    last = meta["history"][-1] if meta["history"] else {}
    echo(f"{head} {meta['status']} in {meta['wall_s']:.0f}s" + (f", loss {last['loss']:.3f}, rankme {last['rankme']:.1f}" if last else "")
         + (f", knn top1 {100 * last['knn_top1']:.2f}" if "knn_top1" in last else "")
         + (f": {meta['stopped_because']}" if meta.get("stopped_because") else ""))
    jobs = executor.map(run_eval, cells, kind="eval")
    if executor.name != "local":
        _note_jobs(out, {t.label: _job_note(j, executor, "eval") for t, j in zip(cells, jobs)})
        echo(f"    submitted {len(jobs)} evaluation jobs ({', '.join(j.job_id for j in jobs)})")
    return [(t, j, None) for t, j in zip(cells, jobs)]


def _collect(outcome: Outcome, head: str, summary: Summary, echo: Any) -> None:
    """Wait for one cell's evaluation job and count it: done (and diverged or stopped), skipped, or failed with its record."""
    task, ejob, pre_err = outcome
    err = pre_err if ejob is None else ejob.exception()
    if err is None and not _finished(task):  # "success" without a valid record is a failure (T15)
        err = RuntimeError(f"job {ejob.job_id if ejob else '-'} ended without a valid result file {task.record_path}")
    if err is not None:
        try:
            failed_record(task, err, "pretrain" if ejob is None else ejob.job_id, "" if ejob is None else ejob.log)
        except OSError as e:  # a full disk: this cell stays unrecorded (a rerun retries it); the grid goes on
            log.warning("could not write the failure record of %s: %s", task.label, e)
        if isinstance(err, NotApplicable):
            summary.not_applicable.append(f"{task.label}: {err}")
            echo(f"{head} {task.label}: skipped: {err}")
        else:
            summary.failed.append(task.label)
            name = getattr(err, "remote_type", type(err).__name__)
            echo(f"{head} {task.label}: failed: {name}: {str(err).splitlines()[0] if str(err) else ''}")
        return
    rec = json.loads(Path(task.record_path).read_text())
    summary.done += 1
    if rec["status"] == "diverged":
        summary.diverged.append(task.label)
    if rec["status"] == "stopped":
        summary.stopped.append(task.label)
    shown = ", ".join(f"{r['metric']} {100 * r['value']:.2f}" for r in rec["rows"] if r["split"] == "test" and r["value"] == r["value"])
    echo(f"{head} {task.label}: {rec['status']} {shown}")

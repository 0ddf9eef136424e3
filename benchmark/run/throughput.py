"""`run_benchmark.py throughput`: pretraining images/s of the fast path and of a plain CPU-DataLoader path, side by side.

Both paths train the same method, backbone, batch and optimizer for the same number of steps on the same data
and differ only in how views reach the model:
- fast: the dataset is uint8 on the device once; each step draws a batch of indices and makes the views there with
  the batched, per-sample augmentations (`benchmark.augment`); channels_last, bf16 autocast on CUDA, optionally
  torch.compile (`--compile`); no host synchronisation inside the loop (losses stay on the device and are read
  once at the end);
- loader: the reference pipeline of the same views per image with torchvision transforms
  (`benchmark.augment.torchvision_view`) in a `DataLoader` with `--workers` processes, pinned memory and
  non-blocking copies, as lightly / solo-learn / VISSL feed their models.
It also reports frozen-feature extraction images/s (inference mode, large batches), the peak GPU memory of each
path, and the seconds of one protocol on the extracted features (`--probe`, default linear@1's 45-point sweep).
The first `--warmup` steps of each path are not timed. On a CPU-only machine the same command runs with small
sizes (CI runs it); its figures then say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import DataConfig, PretrainConfig
from benchmark.data.augment import ViewSpec, make_views, torchvision_view
from benchmark.data.datasets import load_splits
from benchmark.data.sets import ImageSet, Splits
from benchmark.device import describe
from benchmark.errors import SSLBenchError
from benchmark.evaluate.encoder import FrozenEncoder, extract_features, split_features
from benchmark.registry import METHODS, PROTOCOLS
from benchmark.store.io import atomic_write_json, check_writable_file
from benchmark.train.optim import build_optimizer
from benchmark.train.pretrain import build_method, compile_parts


@dataclass
class PathResult:
    path: str
    images_per_s: float
    s_per_step: float
    steps: int
    peak_gpu_mib: float | None  # None on CPU
    final_loss: float


class _Views(torch.utils.data.Dataset[list[Tensor]]):
    """Per-image torchvision views of uint8 images (the CPU-loader path)."""

    def __init__(self, x: Tensor, specs: list[ViewSpec], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.x = x
        self.pipes = [torchvision_view(s, mean, std) for s in specs]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> list[Tensor]:
        return [pipe(self.x[i]) for pipe in self.pipes]


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: nn.Module, opt: torch.optim.Optimizer, views: list[Tensor], progress: float, amp: bool) -> Tensor:
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=amp):
        loss: Tensor = model.loss(views, progress, None)  # type: ignore[operator]
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return loss.detach()


def _fresh(method: str, cfg: PretrainConfig, splits: Splits, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build_method(METHODS.get(method), METHODS.default_config(method), cfg, splits, seed=0).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.train(), build_optimizer(model, cfg)


def fast_path(method: str, cfg: PretrainConfig, splits: Splits, device: torch.device, steps: int, warmup: int) -> PathResult:
    model, opt = _fresh(method, cfg, splits, device)
    compile_parts(model, cfg.compile)  # compiled during the untimed warm-up steps
    specs: list[ViewSpec] = model.views(splits.image_size)  # type: ignore[operator]
    amp = device.type == "cuda" and cfg.amp
    x = splits.train.x.to(device)  # the whole dataset on the device, uint8
    g = torch.Generator(device).manual_seed(0)
    n, b = len(x), cfg.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        idx = torch.randint(n, (b,), generator=g, device=device)
        views = make_views(x[idx], specs, splits.mean, splits.std, g)
        if cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        losses.append(_step(model, opt, views, i / (warmup + steps), amp))
    _sync(device)
    dt = time.perf_counter() - t0
    name = "fast" if cfg.compile == "none" else f"fast (compile {cfg.compile})"
    return PathResult(name, steps * b / dt, dt / steps, steps, _peak(device), float(losses[-1]))


def loader_path(method: str, cfg: PretrainConfig, splits: Splits, device: torch.device, steps: int, warmup: int,
                workers: int) -> PathResult:
    model, opt = _fresh(method, cfg, splits, device)
    specs: list[ViewSpec] = model.views(splits.image_size)  # type: ignore[operator]
    amp = device.type == "cuda" and cfg.amp
    ds = _Views(splits.train.x, specs, splits.mean, splits.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    i, loss = 0, torch.zeros(())
    it = iter(loader)
    while i < warmup + steps:
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        views = [v.to(device, non_blocking=True) for v in batch]
        if cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        loss = _step(model, opt, views, i / (warmup + steps), amp)
        i += 1
    _sync(device)
    dt = time.perf_counter() - t0
    return PathResult(f"loader ({workers} workers)", steps * cfg.batch_size / dt, dt / steps, steps, _peak(device), float(loss))


def frozen_encoder(method: str, cfg: PretrainConfig, splits: Splits, device: torch.device, batch: int) -> FrozenEncoder:
    """The method's (untrained) encoder, frozen, on `device`: what feature extraction and the probe time."""
    model, _ = _fresh(method, cfg, splits, device)
    enc = model.encoder()  # type: ignore[operator]
    return FrozenEncoder(enc, int(enc.dim), splits.mean, splits.std, key="throughput", device=device, batch_size=batch)


@torch.inference_mode()
def feature_rate(fe: FrozenEncoder, splits: Splits) -> float:
    """Frozen-feature extraction images/s over the whole train split (uint8 already on the device)."""
    images = ImageSet(splits.train.x.to(fe.device), splits.train.y)
    extract_features(fe, ImageSet(images.x[: fe.batch_size], images.y[: fe.batch_size]))  # warm-up
    _sync(fe.device)
    t0 = time.perf_counter()
    extract_features(fe, images)
    _sync(fe.device)
    return len(images) / (time.perf_counter() - t0)


def probe_time(fe: FrozenEncoder, splits: Splits, protocol: str) -> dict[str, Any]:
    """Seconds of one protocol with its default settings (e.g. linear@1's full C sweep) on features already extracted,
    and its test top-1: the solver's speed, not the extraction's."""
    feats = split_features(fe, splits)  # extracted once, then served from the encoder's in-process cache
    _sync(fe.device)
    t0 = time.perf_counter()
    rows = PROTOCOLS.get(protocol)(fe, splits, PROTOCOLS.default_config(protocol), 0)
    _sync(fe.device)
    dt = time.perf_counter() - t0
    top1 = next((r.value for r in rows if r.metric == "top1" and r.split == "test"), None)
    n = sum(len(f) for f, _ in feats.values())
    return {"protocol": f"{protocol}@{PROTOCOLS.version(protocol)}", "seconds": dt,
            "features": [n, fe.dim], "test_top1": top1}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = DataConfig(train_size=args.train_size, image_size=args.image_size, storage="memory")  # the paths it compares hold images in memory
    splits = load_splits(args.dataset, data)
    cfg = replace(PretrainConfig(), backbone=args.backbone, batch_size=args.batch_size, optimizer="sgd", lr=0.1,
                  compile=args.compile)
    fast = fast_path(args.method, cfg, splits, device, args.steps, args.warmup)
    loader = loader_path(args.method, cfg, splits, device, args.steps, args.warmup, args.workers)
    fe = frozen_encoder(args.method, cfg, splits, device, args.feature_batch)
    feats = feature_rate(fe, splits)
    probe = None if args.probe == "none" else probe_time(fe, splits, args.probe)
    return {"method": args.method, "backbone": args.backbone, "batch_size": args.batch_size, "image_size": splits.image_size,
            "dataset": args.dataset, "train_size": len(splits.train), "device": describe(device),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "fast": asdict(fast), "loader": asdict(loader),
            "ratio": fast.images_per_s / loader.images_per_s, "features_images_per_s": feats, "probe": probe}


def format_report(r: dict[str, Any]) -> str:
    head = (f"throughput: {r['method']} on {r['backbone']}, batch {r['batch_size']}, {r['image_size']} px {r['dataset']} "
            f"({r['train_size']} images), {r['device']}, torch {r['torch']}, {r['date']}")
    lines = [head, f"{'path':<30} {'images/s':>10} {'s/step':>8} {'peak GPU MiB':>13} {'loss':>8}"]
    for key in ("fast", "loader"):
        p = r[key]
        peak = "-" if p["peak_gpu_mib"] is None else f"{p['peak_gpu_mib']:.0f}"
        lines.append(f"{p['path']:<30} {p['images_per_s']:>10.0f} {p['s_per_step']:>8.4f} {peak:>13} {p['final_loss']:>8.3f}")
    lines.append(f"fast / loader: {r['ratio']:.2f}x")
    lines.append(f"feature extraction: {r['features_images_per_s']:.0f} images/s")
    if r.get("probe"):
        pr = r["probe"]
        n, d = pr["features"]
        lines.append(f"{pr['protocol']} on {n}x{d} features (untrained encoder): {pr['seconds']:.2f} s, test top-1 {100 * pr['test_top1']:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_benchmark.py throughput", description=__doc__.splitlines()[0])
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=None, help="class-balanced subset (default: all)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per path first")
    p.add_argument("--workers", type=int, default=16, help="DataLoader processes of the loader path")
    p.add_argument("--feature-batch", type=int, default=2048)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--probe", default="linear", help="a protocol timed on the extracted features (its default settings; "
                   "linear: the 45-point C sweep), or none")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune",
                                                          "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the fast path's model (give --warmup enough steps to compile in)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    import methods  # noqa: F401  (registers the plugins, as the CLI does)
    import protocols  # noqa: F401

    try:
        if args.method not in METHODS:
            raise SSLBenchError(f"unknown method {args.method!r}; known: {', '.join(METHODS.names())}")
        if args.probe != "none" and args.probe not in PROTOCOLS:
            raise SSLBenchError(f"unknown protocol {args.probe!r} for --probe; known: none, {', '.join(PROTOCOLS.names())}")
        for flag, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--batch-size", args.batch_size, 1),
                                 ("--workers", args.workers, 0), ("--feature-batch", args.feature_batch, 1)):
            if value < low:
                raise SSLBenchError(f"{flag} must be >= {low}, got {value}")
        if args.json:
            check_writable_file(args.json, "--json")  # before the run, not after it
        report = run(args)
    except SSLBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""linear_sgd's lr sweep, one pass (all lrs as heads on one backbone forward) or one run per lr: a command that
prints figures, for `farm-bench` to time side by side (issue 20).

    farm-bench -n 5 --timeout 600 --vs '.venv/bin/python scripts/bench_linear_sgd.py --per-lr' -- \\
        .venv/bin/python scripts/bench_linear_sgd.py

An untrained `convnet` on 2000 Fashion-MNIST images at 28 px, 4 lrs, 5 epochs, BN head, refit on train + val;
torch threads fixed by --threads (default 1). Both paths print the same rows (tested bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-lr", action="store_true", help="one full training per lr (linear_sgd.one_pass: false)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=2000, help="train images (Fashion-MNIST)")
    args = ap.parse_args()

    import torch

    import protocols  # noqa: F401  (registers the protocols)
    from benchmark.backbones import build_backbone
    from benchmark.config import DataConfig, PretrainConfig
    from benchmark.data.datasets import load_splits
    from benchmark.evaluate.encoder import FrozenEncoder
    from protocols.linear_sgd import Config, linear_sgd

    torch.set_num_threads(args.threads)
    data = load_splits("fashion_mnist", DataConfig(train_size=args.n, test_size=500))
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet"), 1, 28)
    enc = FrozenEncoder(module, int(getattr(module, "dim")), data.mean, data.std, key="random")
    cfg = Config(lrs=(0.01, 0.1, 1.0, 10.0), epochs=5, batch_size=256, crop_scale=0.2, bn_head=True, one_pass=not args.per_lr)
    t = time.perf_counter()
    rows = linear_sgd(enc, data, cfg, seed=0)
    print(f"one_pass={cfg.one_pass}: protocol {time.perf_counter() - t:.2f} s, {args.threads} thread(s), {len(data.train)} train images")
    for r in rows:
        print(f"  {r.split} {r.metric} {r.value:.4f} ({r.selection})")


if __name__ == "__main__":
    main()

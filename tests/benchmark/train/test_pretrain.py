"""The pretraining loop: kill -> resume -> identical (T1), divergence (T7)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import ViewSpec
from benchmark.data.sets import Splits
from benchmark.train.pretrain import pretrain
from tests.conftest import REPO

ARGS = ["--suite", "smoke", "--methods", "byol", "--protocols", "knn", "--datasets", "digits",
        "--set", "pretrain.epochs=6", "--set", "pretrain.batch_size=32", "--set", "pretrain.deterministic=true",
        "--set", "data.image_size=16", "--set", "byol.hidden_dim=32", "--no-progress"]


def _start(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_dir(out: Path) -> Path:
    (d,) = (out / "runs" / "digits" / "byol").iterdir()
    return d


def _wait_for(path_glob: Path, pattern: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if list(path_glob.rglob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before {pattern} appeared: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {pattern}")


@pytest.mark.parametrize("kill_after, into_epoch", [("epoch0002.pt.sha256", 0.0), ("epoch0003.pt.sha256", 0.0),
                                                    ("epoch0002.pt.sha256", 0.5)])  # T1: at a boundary and mid-epoch
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path: Path, kill_after: str, into_epoch: float) -> None:
    ref = _start(tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read() if ref.stdout else ""
    epoch_s = [h["epoch_s"] for h in json.loads((_run_dir(tmp_path / "ref") / "pretrain.json").read_text())["history"]]
    victim = _start(tmp_path / "killed")
    _wait_for(tmp_path / "killed", kill_after, victim)
    time.sleep(into_epoch * min(epoch_s))  # half an epoch past the checkpoint: steps done that the rerun must redo
    assert victim.poll() is None, "the run finished before the kill"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (_run_dir(tmp_path / "killed") / "encoder.safetensors").exists()
    again = _start(tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stdout.read() if again.stdout else ""
    a = load_file(str(_run_dir(tmp_path / "ref") / "encoder.safetensors"))
    b = load_file(str(_run_dir(tmp_path / "killed") / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(_run_dir(tmp_path / "ref") / "checkpoints" / "epoch0006.pt", weights_only=True)
    cb = torch.load(_run_dir(tmp_path / "killed") / "checkpoints" / "epoch0006.pt", weights_only=True)
    for k, t in ca["model"].items():  # target network and predictor too
        assert torch.equal(t, cb["model"][k]), k
    meta = json.loads((_run_dir(tmp_path / "killed") / "pretrain.json").read_text())
    assert meta["attempts"] == 2
    rows = (tmp_path / "killed" / "results.csv").read_text()
    assert ",ok," in rows


class NaNAt(nn.Module):
    """A method whose loss becomes NaN at a given step (T7a)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.backbone = ConvNet(1, (4, 8))
        self.at, self.calls = at, 0

    def views(self, image_size: int) -> list[ViewSpec]:
        return [ViewSpec(size=image_size)]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        out = self.backbone(views[0]).pow(2).mean()
        return out * float("nan") if self.calls > self.at else out

    def encoder(self) -> nn.Module:
        return self.backbone


def test_nan_loss_stops_the_run_as_diverged(digits: Splits, tmp_path: Path) -> None:
    model = NaNAt(at=5)
    out = pretrain(model, digits, PretrainConfig(epochs=3, batch_size=64, lr=0.01), 0, tmp_path, torch.device("cpu"), progress=False)
    assert out.status == "diverged"
    assert out.diverged_at == 5 and model.calls == 6  # stopped at the first non-finite loss
    assert out.last_finite_loss is not None and out.last_finite_loss == out.last_finite_loss


class HugeAt(NaNAt):
    """A finite loss that passes the method's declared bound at a given step (issue 18.2: supervised at lr 1e6)."""

    loss_bound = 100.0

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        out = super().loss(views, progress, labels)
        return out * 0 + 1e3 if self.calls > 4 else out * 0 + 99.0


class BlowsUp(NaNAt):
    """A bounded, finite loss while the weights go to inf (issue 18.2: simclr's cosine loss at lr 1e6)."""

    fill = float("inf")

    def __init__(self) -> None:
        super().__init__(at=10**9)
        self.p = nn.Parameter(torch.ones(()))

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        if self.calls < 2:
            return super().loss(views, progress, labels) + (self.p - 0.5) ** 2
        self.calls += 1
        with torch.no_grad():
            self.backbone.body[0].weight.fill_(self.fill)
        return (self.p - 0.5) ** 2  # finite whatever the backbone holds


@pytest.mark.parametrize("fill, because", [(float("inf"), r"^1 weight tensor\(s\) hold inf or NaN \(backbone\.body\.0\.weight\)$"),
                                           (3e12, r"a weight reached 3e\+12 \(bound 1e\+10\)")])
def test_finite_loss_over_blown_up_weights_is_divergence(digits: Splits, tmp_path: Path, fill: float, because: str) -> None:
    model = BlowsUp()
    model.fill = fill
    out = pretrain(model, digits, PretrainConfig(epochs=2, batch_size=64, lr=0.01), 0, tmp_path, torch.device("cpu"), progress=False)
    assert out.status == "diverged" and re.search(because, out.reason), out.reason
    assert out.diverged_at == len(digits.train) // 64  # found at the end of the first epoch


@pytest.mark.parametrize("sync_every", [1, 3])
def test_a_loss_beyond_the_methods_bound_is_divergence(digits: Splits, tmp_path: Path, sync_every: int) -> None:
    cfg = PretrainConfig(epochs=3, batch_size=64, lr=0.01, sync_every=sync_every)
    out = pretrain(HugeAt(at=10**9), digits, cfg, 0, tmp_path, torch.device("cpu"), progress=False)
    assert out.status == "diverged" and out.diverged_at == 4 and out.last_finite_loss == 99.0
    assert out.reason == "loss 1000 beyond the method's bound 100"


def test_deferred_loss_reads_find_the_same_divergence_and_train_the_same(digits: Splits, tmp_path: Path) -> None:
    # GPU path: the loss is read on the host every `sync_every` steps, not every step
    model = NaNAt(at=5)
    cfg = PretrainConfig(epochs=3, batch_size=64, lr=0.01, sync_every=4)
    out = pretrain(model, digits, cfg, 0, tmp_path / "nan", torch.device("cpu"), progress=False)
    assert out.status == "diverged" and out.diverged_at == 5 and model.calls == 8  # found at the read after step 8
    runs = []
    for every in (1, 3):
        torch.manual_seed(0)
        m = NaNAt(at=10**9)
        c = PretrainConfig(epochs=2, batch_size=64, lr=0.01, sync_every=every)
        o = pretrain(m, digits, c, 0, tmp_path / f"ok{every}", torch.device("cpu"), progress=False)
        runs.append((o, m.backbone.state_dict()))
    (a, wa), (b, wb) = runs
    assert a.status == b.status == "ok" and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-12)
    assert a.last_finite_loss == b.last_finite_loss


class Constant(nn.Module):
    """A collapsed encoder: every image maps to the same vector (T7b)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))
        self.dim = 16

    def forward(self, x: Tensor) -> Tensor:
        return self.w.expand(len(x), -1) + 0 * x.mean()


class Collapsing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Constant()

    def views(self, image_size: int) -> list[ViewSpec]:
        return [ViewSpec(size=image_size)]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        return self.backbone(views[0]).sum() * 0

    def encoder(self) -> nn.Module:
        return self.backbone


def test_collapsed_encoder_is_flagged(digits: Splits, tmp_path: Path) -> None:
    out = pretrain(Collapsing(), digits, PretrainConfig(epochs=1, batch_size=64), 0, tmp_path, torch.device("cpu"), progress=False)
    assert out.status == "collapsed"
    assert out.history[-1]["std_l2"] < 0.01 and out.history[-1]["rankme"] < 1.5


class Recording(ConvNet):
    """A backbone that counts its calls, and those that ran compiled (a buffer: no guard, no recompilation)."""

    def __init__(self) -> None:
        super().__init__(1, (4, 8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("compiled", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.compiled += int(torch.compiler.is_compiling())
        return super().forward(x)


class Plain(NaNAt):
    def __init__(self) -> None:
        super().__init__(at=10**9)
        self.backbone = Recording()


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile (inductor) on CPU needs a C compiler")
def test_compiled_training_matches_eager_and_hands_back_an_eager_encoder(digits: Splits, tmp_path: Path) -> None:
    runs = {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        m = Plain()
        cfg = PretrainConfig(epochs=1, batch_size=128, lr=0.01, compile=mode)
        runs[mode] = (pretrain(m, digits, cfg, 0, tmp_path / mode, torch.device("cpu"), progress=False), m)
    (eager, me), (compiled, mc) = runs["none"], runs["default"]
    assert me.backbone.compiled == 0 and mc.backbone.compiled == mc.backbone.calls == me.backbone.calls > 0
    assert compiled.status == "ok" and compiled.steps == eager.steps
    assert compiled.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)
    we, wc = me.backbone.state_dict(), mc.backbone.state_dict()
    assert we.keys() == wc.keys()
    assert all(torch.allclose(we[k], wc[k], atol=1e-5) for k in we if k != "compiled"), "weights drifted"
    before = (int(mc.backbone.calls), int(mc.backbone.compiled))
    compiled.encoder(torch.zeros(2, 1, 8, 8))
    assert (int(mc.backbone.calls), int(mc.backbone.compiled)) == (before[0] + 1, before[1])  # eager for the protocols


def test_a_deterministic_run_leaves_the_process_as_it_found_it(digits: Splits, tmp_path: Path) -> None:
    """Issue 18.15: `pretrain.deterministic=true` switched torch's deterministic mode on for the rest of the process."""
    assert not torch.are_deterministic_algorithms_enabled()
    cfg = PretrainConfig(epochs=1, batch_size=256, lr=0.01, deterministic=True)
    pretrain(NaNAt(at=10**9), digits, cfg, 0, tmp_path, torch.device("cpu"), progress=False)
    assert not torch.are_deterministic_algorithms_enabled()


class OOMAt(NaNAt):
    """A loss that runs out of memory above a batch size (T8 for pretraining)."""

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        if len(views[0]) > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().loss(views, progress, labels)


def test_pretraining_out_of_memory_names_the_batch_and_never_shrinks_it(digits: Splits, tmp_path: Path) -> None:
    """T8: an OOM in pretraining is one line naming the batch and the knob, never a silently smaller batch."""
    from benchmark.train.pretrain import PretrainOOM

    with pytest.raises(PretrainOOM, match=r"^out of memory in pretraining at pretrain.batch_size=64 \(1 views, 16 px\) "
                                          r"on cpu with convnet: lower pretrain.batch_size"):
        pretrain(OOMAt(at=10**9), digits, PretrainConfig(epochs=1, batch_size=64), 0, tmp_path, torch.device("cpu"), progress=False)
    assert not list(tmp_path.rglob("epoch*.pt"))
    ok = pretrain(OOMAt(at=10**9), digits, PretrainConfig(epochs=1, batch_size=32), 0, tmp_path / "b", torch.device("cpu"), progress=False)
    assert ok.status == "ok" and ok.steps == len(digits.train) // 32

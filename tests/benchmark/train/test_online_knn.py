"""Online kNN during pretraining: the protocol's number, observation only, resumable, milestones, TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig, apply_overrides
from benchmark.data.augment import ViewSpec
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.registry import SUITES
from benchmark.run.cli import build_request, get_args_parser
from benchmark.store.results import record_problems
from benchmark.train.pretrain import PretrainOutcome, knn_bank, knn_due, pretrain
from protocols.knn import Config as KNNConfig
from protocols.knn import knn
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
TIMES = ("epoch_s", "knn_s")  # wall-clock entries of a history: the only ones two runs may differ in


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of an epoch."""


class Noisy(nn.Module):
    """A tiny method with BN in its backbone and dropout in its loss (the global RNG), so that an evaluation that
    moved BN statistics or drew random numbers would change training."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.backbone = ConvNet(1, (4, 8))
        self.kill_at, self.calls = kill_at, 0

    def views(self, image_size: int) -> list[ViewSpec]:
        return [ViewSpec(size=image_size, scale=(0.3, 1.0)), ViewSpec(size=image_size, scale=(0.3, 1.0))]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        if self.kill_at is not None and self.calls > self.kill_at:
            raise Killed()
        z1, z2 = (F.normalize(F.dropout(self.backbone(v), 0.2), dim=1) for v in views)
        return 2 - 2 * (z1 * z2).sum(dim=1).mean()

    def encoder(self) -> nn.Module:
        return self.backbone


def _cfg(**kw: object) -> PretrainConfig:
    return PretrainConfig(**{"epochs": 2, "batch_size": 128, "lr": 0.05, "eval_every": 1, "knn_bank": 500, **kw})  # type: ignore[arg-type]


def _train(digits: Splits, folder: Path, cfg: PretrainConfig, kill_at: int | None = None) -> tuple[PretrainOutcome, Noisy]:
    torch.manual_seed(0)
    model = Noisy(kill_at)
    return pretrain(model, digits, cfg, 0, folder, CPU, progress=False), model


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMES} for h in history]


def test_online_knn_is_the_knn_protocol_on_the_same_bank(digits: Splits, tmp_path: Path) -> None:
    out, model = _train(digits, tmp_path, _cfg())
    last = out.history[-1]
    assert {"knn_top1", "knn_top5", "knn_s"} <= set(last) and last["knn_s"] > 0
    bank = knn_bank(len(digits.train), 500, 0)
    assert len(bank) == 500 and torch.equal(bank, knn_bank(len(digits.train), 500, 0))  # fixed by the seed
    # the protocol's bank is train + val: train = the online bank, val empty; it scores test = the online val
    same = dataclasses.replace(digits, train=digits.train.subset(bank), val=digits.val.subset(torch.arange(0)),  # type: ignore[arg-type]
                               test=digits.val)
    rows = {r.metric: r.value for r in knn(FrozenEncoder(model.encoder(), 8, digits.mean, digits.std, key="t"), same,
                                           KNNConfig(k=20, temperature=0.07), 0)}
    assert last["knn_top1"] == pytest.approx(rows["top1"], abs=1e-6)
    assert last["knn_top5"] == pytest.approx(rows["top5"], abs=1e-6)
    assert 0.2 < last["knn_top1"] <= 1  # digits: far above chance (0.1) after two epochs


def test_online_knn_does_not_change_training(digits: Splits, tmp_path: Path) -> None:
    on, m_on = _train(digits, tmp_path / "on", _cfg(epochs=3))
    off, m_off = _train(digits, tmp_path / "off", _cfg(epochs=3, eval_every=0))
    assert [h["loss"] for h in on.history] == [h["loss"] for h in off.history]
    a, b = m_on.state_dict(), m_off.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BN running statistics included
    assert all("knn_top1" in h for h in on.history) and not any("knn_top1" in h for h in off.history)
    assert m_on.training and all(m.training for m in m_on.modules())  # each module's mode put back


def test_a_killed_and_resumed_run_has_the_same_history(digits: Splits, tmp_path: Path) -> None:
    cfg = _cfg(epochs=4, eval_every=2)
    ref, _ = _train(digits, tmp_path / "ref", cfg)
    steps = len(digits.train) // 128
    with pytest.raises(Killed):  # in the middle of epoch 3, after epoch 2's checkpoint (and its online kNN)
        _train(digits, tmp_path / "killed", cfg, kill_at=2 * steps + steps // 2)
    again, _ = _train(digits, tmp_path / "killed", cfg)
    assert [("knn_top1" in h) for h in ref.history] == [False, True, False, True]
    assert _untimed(again.history) == _untimed(ref.history)


@pytest.mark.parametrize("every, stop_below, epochs, due", [(5, "", 20, [5, 10, 15, 20]), (6, "", 20, [6, 12, 18, 20]),
                                                             (0, "", 20, []), (0, "3:0.1", 20, [3]),
                                                             (5, "3:0.1,10:0.5", 12, [3, 5, 10, 12])])
def test_knn_is_due_every_n_epochs_at_the_last_and_at_milestones(every: int, stop_below: str, epochs: int, due: list[int]) -> None:
    cfg = PretrainConfig(epochs=epochs, eval_every=every, stop_below=stop_below)
    assert [e for e in range(1, epochs + 1) if knn_due(cfg, e)] == due


def test_a_missed_milestone_stops_the_run_and_a_resume_stays_stopped(digits: Splits, tmp_path: Path) -> None:
    out, _ = _train(digits, tmp_path, _cfg(epochs=3, eval_every=0, stop_below="1:0.99"))
    assert out.status == "stopped" and len(out.history) == 1
    assert out.reason == f"knn top1 {out.history[0]['knn_top1']:.4f} < 0.99 at epoch 1 (pretrain.stop_below)"
    assert (tmp_path / "epoch0001.pt").is_file()  # saved at the stop
    again, model = _train(digits, tmp_path, _cfg(epochs=3, eval_every=0, stop_below="1:0.99"))
    assert again.status == "stopped" and again.reason == out.reason and model.calls == 0  # not trained further
    passed, _ = _train(digits, tmp_path / "pass", _cfg(epochs=2, eval_every=0, stop_below="1:0.01"))
    assert passed.status == "ok" and [("knn_top1" in h) for h in passed.history] == [True, False]


@pytest.mark.parametrize("bad, message", [("10", r"'10' in '10' is not EPOCH:MIN_TOP1"),
                                          ("10:x", r"'10:x' in '10:x' is not EPOCH:MIN_TOP1 \(e.g. '10:0.3,50:0.5'\)"),
                                          ("0:0.3", r"epoch 0 in '0:0.3' must be >= 1"),
                                          ("10:30", r"minimum top-1 30 in '10:30' must be in \[0, 1\] \(a fraction, not %\)"),
                                          ("10:0.3,10:0.5", r"epoch 10 has two milestones"),
                                          ("10:0.3,", r"'' in '10:0.3,' is not EPOCH:MIN_TOP1")])
def test_bad_milestones_are_one_clear_config_error(bad: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^pretrain.stop_below: " + message):
        apply_overrides(PretrainConfig(), {"stop_below": bad}, "pretrain")


def test_new_observation_settings_leave_config_hashes_alone() -> None:
    from benchmark.config import config_hash

    base = config_hash({"pretrain": PretrainConfig()})
    observe = PretrainConfig(eval_every=1, knn_bank=10, knn_k=5, knn_temperature=0.1, tensorboard=True)
    assert config_hash({"pretrain": observe}) == base
    assert config_hash({"pretrain": PretrainConfig(stop_below="10:0.3")}) != base  # it changes what a run ends as


def test_smoke_turns_online_knn_off_and_other_suites_keep_it() -> None:
    assert SUITES.get("smoke").overrides["pretrain"]["eval_every"] == 0
    assert all("eval_every" not in SUITES.get(n).overrides.get("pretrain", {}) for n in SUITES.names() if n != "smoke")


def test_the_tensorboard_logger_writes_each_epochs_scalars(digits: Splits, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    out = pretrain(Noisy(), digits, _cfg(tensorboard=True), 0, tmp_path / "ckpt", CPU, progress=False,
                   tensorboard_dir=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert {"pretrain/loss", "pretrain/std_l2", "pretrain/rankme", "pretrain/knn_top1", "pretrain/lr"} <= set(ea.Tags()["scalars"])
    loss = ea.Scalars("pretrain/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in out.history], rel=1e-6)
    assert [e.value for e in ea.Scalars("pretrain/knn_top1")] == pytest.approx([h["knn_top1"] for h in out.history], rel=1e-6)


def test_tensorboard_missing_is_one_line(digits: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an environment without it raises
    with pytest.raises(ConfigError, match=r"^pretrain.tensorboard needs the tensorboard package: pip install tensorboard$"):
        pretrain(Noisy(), digits, _cfg(tensorboard=True), 0, tmp_path, CPU, progress=False)


def test_logger_flag_sets_pretrain_tensorboard() -> None:
    parse = get_args_parser().parse_args
    assert build_request(parse(["--suite", "smoke", "--logger", "tensorboard"])).overrides["pretrain"]["tensorboard"] is True
    assert "tensorboard" not in build_request(parse(["--suite", "smoke"])).overrides["pretrain"]
    # --set wins over the flag
    req = build_request(parse(["--suite", "smoke", "--logger", "tensorboard", "--set", "pretrain.tensorboard=false"]))
    assert req.overrides["pretrain"]["tensorboard"] is False


def test_a_stopped_run_is_a_status_without_metrics(tmp_path: Path) -> None:
    args = ("--suite", "smoke", "--datasets", "digits", "--set", "data.image_size=16", "--set", "pretrain.stop_below=1:0.99",
            "--out", str(tmp_path))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr  # as a diverged run: a finished cell, not a failure
    assert "stopped early (pretrain.stop_below): simclr/digits/seed0 knn@1" in r.stdout
    df = pd.read_csv(tmp_path / "results.csv")
    assert df.status.tolist() == ["stopped"] and df.metric.tolist() == ["stopped"] and df.value.isna().all()
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails.status.tolist() == ["stopped"]
    assert fails["flags"].str.fullmatch(r"because=knn top1 0\.\d{4} < 0\.99 at epoch 1 \(pretrain\.stop_below\)").all()
    assert "simclr" not in pd.read_csv(tmp_path / "leaderboard.csv").get("method", pd.Series(dtype=str)).tolist()
    (record,) = (tmp_path / "records" / "digits" / "simclr" / "knn@1").glob("seed0-*.json")
    assert record_problems(json.loads(record.read_text())) == []
    (meta,) = (tmp_path / "runs").rglob("pretrain.json")
    assert json.loads(meta.read_text())["status"] == "stopped" and not (meta.parent / "encoder.safetensors").exists()
    again = run_cli(*args)
    assert again.returncode == 0 and "1 of 1 cells already have results" in again.stdout, again.stdout + again.stderr
    assert json.loads(meta.read_text())["attempts"] == 1  # finished: not retrained

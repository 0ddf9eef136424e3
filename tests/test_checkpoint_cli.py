"""Evaluating someone's checkpoint from the command line (`--checkpoint`, `export`): issue 8 end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torchvision

from benchmark.store.importers import import_encoder
from tests.conftest import run_cli

GRID = ["--suite", "smoke", "--datasets", "digits", "--protocols", "knn", "--set", "data.image_size=16"]


def _resnet18(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_a_checkpoint_is_a_leaderboard_row_and_a_changed_file_invalidates_only_its_cells(tmp_path: Path) -> None:
    a, b, out = _resnet18(tmp_path / "a.pth", 0), _resnet18(tmp_path / "b.pth", 1), tmp_path / "out"
    r = run_cli(*GRID, "--checkpoint", f"tv_a={a}@resnet18", "--checkpoint", f"tv_b={b}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("as layout 'torchvision' into resnet18") == 2 and "120 tensors loaded, 0 missing" in r.stdout
    df = pd.read_csv(out / "results.csv")
    rows = df[(df.split == "test") & (df.metric == "top1")].set_index("method")
    assert sorted(rows.index) == ["tv_a", "tv_b"] and rows.value.between(0.5, 1).all()
    assert rows.loc["tv_a", "checkpoint"] == str(a) and rows.loc["tv_a", "backbone"] == "resnet18"
    from benchmark.store.checkpoints import sha256_file

    assert rows.loc["tv_a", "checkpoint_sha256"] == sha256_file(a)
    _resnet18(b, 2)  # b's weights change: only b's cell reruns
    r = run_cli(*GRID, "--checkpoint", f"tv_a={a}", "--checkpoint", f"tv_b={b}", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "1 of 2 cells already have results" in r.stdout and "tv_b/digits/seed0 knn@1: ok" in r.stdout
    df = pd.read_csv(out / "results.csv")
    old_and_new = df[(df.method == "tv_b") & (df.metric == "top1")].sort_values("finished_at")
    assert old_and_new.checkpoint_sha256.tolist()[-1] == sha256_file(b) and old_and_new.pretrain_setting.nunique() == 2
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")  # the new file keeps the name; the old is tagged
    assert sorted(board.index) == sorted(["tv_a", "tv_b", f"tv_b {{{old_and_new.pretrain_setting.iloc[0][:6]}}}"])


def test_bad_checkpoints_fail_before_any_work_with_one_line(tmp_path: Path) -> None:
    a = _resnet18(tmp_path / "a.pth", 0)
    cases = {
        f"x={tmp_path / 'missing.pth'}": "does not exist",
        f"x={tmp_path}": "is a directory",
        f"x={a}@resnet50": "does not fit resnet50",
        f"x={a}": None,  # fine alone; clashes with a method name below
    }
    for spec, message in cases.items():
        if message is None:
            continue
        r = run_cli(*GRID, "--checkpoint", spec, "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*GRID, "--methods", "random", "--checkpoint", f"random={a}", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "also given in --methods" in r.stderr
    assert not (tmp_path / "out" / "records").exists()


def test_a_checkpoint_of_inf_or_nan_weights_is_refused_not_scored(tmp_path: Path) -> None:
    """Issue 18.3: +inf weights scored 10.00 / 50.00 'ok'; NaN weights failed as 'protocol knn changed the frozen
    encoder'. Both are now one line at planning, exit 2, nothing written."""
    for name, value in (("inf", float("inf")), ("nan", float("nan"))):
        torch.manual_seed(0)
        sd = torchvision.models.resnet18().state_dict()
        sd = {k: v.fill_(value) if v.is_floating_point() else v for k, v in sd.items()}
        torch.save(sd, tmp_path / f"{name}.pth")
        r = run_cli(*GRID, "--checkpoint", f"{name}={tmp_path / f'{name}.pth'}", "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "tensor(s) hold inf or NaN (conv1.weight, bn1.weight, bn1.bias, ...)" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_export_to_torchvision_round_trips_bit_identically(tmp_path: Path) -> None:
    a = _resnet18(tmp_path / "a.pth", 0)
    r = run_cli("export", f"{a}@resnet18", "--format", "torchvision", "--to", str(tmp_path / "tv.pth"))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(a), "--format", "detectron2", "--to", str(tmp_path / "d2.pkl"))
    assert r.returncode == 0 and (tmp_path / "d2.pkl").stat().st_size > 1e6, r.stderr
    x = torch.randn(2, 3, 32, 32)
    m1, _ = import_encoder(a)
    m2, rep = import_encoder(tmp_path / "tv.pth")
    assert rep.layout == "torchvision" and torch.equal(m1(x), m2(x))


def test_trust_is_given_per_checkpoint(tmp_path: Path) -> None:
    """Issue 18.13: --trust-checkpoint trusted every --checkpoint of the command; now it names the one it trusts."""
    import fractions

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        torch.save({**torchvision.models.resnet18().state_dict(), "note": fractions.Fraction(1, 3)}, tmp_path / f"{name}.pth")
    specs = ["--checkpoint", f"a={tmp_path / 'a.pth'}", "--checkpoint", f"b={tmp_path / 'b.pth'}", "--out", str(tmp_path / "o")]
    r = run_cli(*GRID, *specs, "--trust-checkpoint", "b")
    assert r.returncode == 2 and "a.pth needs globals outside the reviewed allowlist: fractions.Fraction" in r.stderr, r.stderr
    r = run_cli(*GRID, *specs, "--trust-checkpoint", "c")
    assert r.returncode == 2 and "--trust-checkpoint c: no --checkpoint has that NAME (given: a, b)" in r.stderr, r.stderr
    r = run_cli(*GRID, *specs, "--trust-checkpoint", "a", "--trust-checkpoint", "b")
    assert r.returncode == 0, r.stderr
    assert sorted(pd.read_csv(tmp_path / "o" / "leaderboard.csv").method) == ["a", "b"]

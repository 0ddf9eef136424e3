"""The command line as a user meets it: the smoke suite, reruns, --list and bad input (T3, T11, T12, T14)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from benchmark.registry import METHODS, PROTOCOLS
from benchmark.store.results import COLUMNS
from tests.conftest import run_cli

REQUIRED = ["method", "protocol", "protocol_version", "dataset", "split", "metric", "value", "seed",
            "config_hash", "git_sha", "device", "wall_s"]
SMALL = ["--suite", "smoke", "--datasets", "digits", "--set", "data.image_size=16"]


def test_list_shows_every_registry() -> None:
    r = run_cli("--list")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and not line.startswith("  "))
    assert lines["methods"].split(", ") == METHODS.names()
    assert lines["protocols"].split(", ") == [f"{n}@{PROTOCOLS.entry(n).meta['version']}" for n in PROTOCOLS.names()]
    for word in ("fashion_mnist", "digits", "resnet18", "vit_small", "smoke:", "default:", "gpu:"):
        assert word in r.stdout


def test_smoke_suite_writes_tables_with_provenance_and_reruns_as_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(*SMALL, "--methods", "simclr,random", "--protocols", "knn,linear", "--seeds", "0,1",
                "--set", "linear.grid_points=3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS and set(REQUIRED) <= set(df.columns)
    test = df[df.split == "test"]
    assert len(test.groupby(["method", "protocol", "seed", "metric"])) == 2 * 2 * 2 * 3  # top1, top5, mean_class_acc
    assert test.value.between(0, 1).all() and (test.status == "ok").all()
    assert df.git_sha.notna().all() and df.config_hash.str.len().eq(12).all()
    # the pretraining's own code is recorded too (an encoder may be reused by later evaluations)
    assert df.pretrain_git_sha.notna().all() and (df.pretrain_git_sha == df.git_sha).all()
    pmeta = json.loads(next((out / "runs").rglob("pretrain.json")).read_text())
    assert pmeta["git_sha"] == df.git_sha.iloc[0] and pmeta["versions"]["torch"] == torch.__version__
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board.method) == {"simclr", "random"} and (board.n_seeds == 2).all()
    assert "digits/knn@1/top1" in board.columns and "±" in board["digits/knn@1/top1"].iloc[0]
    assert "| method |" in (out / "leaderboard.md").read_text()
    records = list((out / "records").rglob("*.json"))
    assert len(records) == 8 and all(json.loads(p.read_text())["status"] == "ok" for p in records)
    assert list(out.rglob("*.tmp")) == []
    again = run_cli(*SMALL, "--methods", "simclr,random", "--protocols", "knn,linear", "--seeds", "0,1",
                    "--set", "linear.grid_points=3", "--out", str(out))
    assert again.returncode == 0 and "8 of 8 cells already have results" in again.stdout
    assert "0 cells done, 8 reused" in again.stdout
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)


def test_changed_config_invalidates_its_cells(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(*SMALL, "--out", str(out)).returncode == 0
    r = run_cli(*SMALL, "--set", "knn.k=5", "--out", str(out))
    assert r.returncode == 0 and "1 cells done, 0 reused" in r.stdout
    df = pd.read_csv(out / "results.csv")
    top1 = df[df.metric == "top1"]  # each configuration keeps its own row (issue 18.1)
    assert top1.selection.tolist() == ["fixed k=20 T=0.07", "fixed k=5 T=0.07"]
    assert top1["protocol_variant"].fillna("").tolist() == ["", "knn.k=5"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "simclrr"], "unknown method 'simclrr'; did you mean 'simclr'?"),
        (["--protocols", "knnn"], "unknown protocol 'knnn'; did you mean 'knn'?"),
        (["--datasets", "fashion-mnist"], "unknown dataset 'fashion-mnist'; did you mean 'fashion_mnist'?"),
        (["--suite", "smok"], "unknown suite 'smok'; did you mean 'smoke'?"),
        (["--set", "pretrain.lr=0"], "pretrain.lr must be a finite number > 0"),
        (["--set", "pretrain.lr=-1"], "pretrain.lr must be a finite number > 0"),
        (["--set", "pretrain.batch_size=0"], "pretrain.batch_size must be > 0"),
        (["--set", "data.val_fraction=1.5"], "data.val_fraction must be in (0, 1)"),
        (["--set", "knn.kk=3"], "unknown key knn.kk; valid fields of knn: k, temperature"),
        (["--set", "knnn.k=3"], "unknown config section 'knnn'; did you mean 'knn'?"),
        (["--seeds", "0,0"], "--seeds must be distinct"),
        (["--seeds", "a"], "--seeds must be comma-separated integers"),
        # issue 18.7: each of these passed planning and failed later with a traceback and files written
        (["--set", "pretrain.backbone=resnet9000"], "unknown backbone 'resnet9000'; did you mean 'resnet50'?"),
        (["--seeds", str(2**63)], "--seeds must be distinct integers in [0, 2^63)"),
        (["--set", "data.train_size=5"], "its 10 classes need one validation and one training image each; use data.train_size >= 20"),
        (["--set", "data.image_size=100000"], "data.image_size=100000 would hold"),
        (["--data-root", "/nonexistent/fmnist", "--datasets", "fashion_mnist"],
         "dataset 'fashion_mnist' not found at /nonexistent/fmnist. Install it with `sudo apt-get install dataset-fashion-mnist`"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    r = run_cli(*SMALL, *args, "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists()


def test_malformed_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("knn:\n  k: 20\n  temperature: [0.1\n")
    r = run_cli(*SMALL, "--config", str(cfg), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "malformed YAML in" in r.stderr and "line" in r.stderr
    assert not (tmp_path / "out").exists()


def _bomb(levels: int = 9) -> str:
    """Billion laughs: each level 10 aliases of the one before (10^9 values from about 400 bytes)."""
    lines = ["  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "knn:\n" + "\n".join(lines) + f"\n  k: *l{levels - 1}\n"


def test_yaml_bombs_and_binary_configs_are_one_line(tmp_path: Path) -> None:
    """Issue 18.8: a 433-byte YAML bomb grew to 3.7 GB and died with MemoryError (the error message built the repr of
    the whole value); binary garbage as --config was a UnicodeDecodeError traceback."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    flow = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [{', '.join([f'*{p}'] * 10)}]"
                                                                    for p, c in zip("abcdefgh", "bcdefghi")]) + "]"
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    cases = [(["--config", str(bomb)], "expands to more than 100,000 values"),
             (["--set", f"knn.k={flow}"], "--set knn.k expands to more than 100,000 values"),
             (["--config", str(garbage)], "is not UTF-8 text"),
             (["--set", f"knn.k=[{', '.join(['1'] * 30_000)}]"], "knn.k must be an integer, got [1, 1, 1, 1, 1, 1, ...]")]
    for args, message in cases:
        r = run_cli(*SMALL, *args, "--out", str(tmp_path / "out"), timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and len(lines[0]) < 400, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_unwritable_output_paths_are_one_line_before_any_work(tmp_path: Path) -> None:
    """Issue 18.9: each was a traceback after planning (--out), after the import (export --to), after the whole run
    or at once with UnboundLocalError (throughput --json, --steps 0)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    cases = [
        ([*SMALL, "--out", str(a_file)], "--out " + str(a_file) + " is a file, not a folder"),
        ([*SMALL, "--out", str(a_file / "sub")], "cannot be written (Not a directory)"),
        ([*SMALL, "--out", "/proc/sslbench-out"], "--out /proc/sslbench-out cannot be written"),
        (["export", str(tmp_path / "r18.pth"), "--format", "torchvision", "--to", str(folder)], f"--to {folder} is a folder"),
        (["export", str(tmp_path / "r18.pth"), "--format", "torchvision", "--to", str(a_file / "x.pth")], "cannot be written"),
        (["throughput", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["throughput", "--json", "/proc/sslbench.json"], "--json /proc/sslbench.json cannot be written"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)
    assert a_file.read_text() == "x" and not any(folder.iterdir())


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_end_with_one_line_and_the_rerun_resumes(tmp_path: Path, sig: int, code: int, word: str) -> None:
    """Issue 18.11: Ctrl-C printed a KeyboardInterrupt traceback; SIGTERM ended the process without a word."""
    from tests.conftest import REPO

    args = [*SMALL, "--set", "pretrain.epochs=30", "--set", "pretrain.batch_size=64", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("epoch*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err.strip().splitlines() == [
        f"{word}; finished cells and epoch checkpoints are kept: rerun the same command to resume"], err
    assert not list((tmp_path / "records").rglob("*.json")) if (tmp_path / "records").exists() else True
    r = run_cli(*args, "-v")
    assert r.returncode == 0 and "resumed from epoch" in r.stderr, r.stderr[-2000:]


def test_a_killed_orchestrator_reruns_exactly_the_missing_cells_and_force_reruns_all(tmp_path: Path) -> None:
    """T9: the command SIGKILLed after its first finished cell; the rerun runs only the others; --force runs all."""
    from tests.conftest import REPO

    args = [*SMALL, "--methods", "random,simclr", "--protocols", "knn,linear", "--set", "linear.grid_points=2",
            "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "records").rglob("seed0-*.json")) if (tmp_path / "records").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first record"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = len([p for p in (tmp_path / "records").rglob("seed0-*.json") if not p.name.endswith(".failed.json")])
    assert 1 <= done < 4
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{done} of 4 cells already have results" in r.stdout and f"{4 - done} cells done, {done} reused" in r.stdout
    r = run_cli(*args, "--force")
    assert r.returncode == 0 and "4 cells done, 0 reused" in r.stdout, r.stdout


def test_a_write_killed_midway_leaves_the_old_file_and_its_temp_is_cleaned(tmp_path: Path) -> None:
    """T3(b): SIGKILL inside an atomic write: the target keeps its old bytes; the next run removes the stale temp."""
    import os

    target = tmp_path / "out" / "records" / "cell.json"
    target.parent.mkdir(parents=True)
    target.write_text('{"old": true}')
    code = ("import time; from benchmark.store.io import atomic_save\n"
            "def slow(p):\n    p.write_text('{\"half\": ')\n    print('writing', flush=True)\n    time.sleep(60)\n"
            f"atomic_save({str(target)!r}, slow)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    (temp,) = list(target.parent.glob(".cell.json.*.tmp"))
    assert target.read_text() == '{"old": true}'
    os.utime(temp, (time.time() - 7200, time.time() - 7200))  # two hours old: nobody is writing it
    young = target.parent / ".other.json.x.tmp"
    young.write_text("{")  # a write that may still be going on is left alone
    r = run_cli(*SMALL, "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "removed 1 temporary files of interrupted writes" in r.stdout, r.stdout
    assert not temp.exists() and young.exists() and target.read_text() == '{"old": true}'


def test_every_record_obeys_the_schema_and_one_row_reexecutes_bit_for_bit(tmp_path: Path) -> None:
    """T14: the records a run writes pass `record_problems`; a row re-executed from its own recorded config and seed
    (into a fresh --out) reproduces its metric bit for bit on the CPU."""
    import yaml

    from benchmark.store.results import record_problems

    first = tmp_path / "first"
    r = run_cli(*SMALL, "--methods", "simclr,random", "--protocols", "knn,linear", "--set", "linear.grid_points=2",
                "--out", str(first))
    assert r.returncode == 0, r.stderr
    records = [json.loads(p.read_text()) for p in (first / "records").rglob("*.json")]
    assert len(records) == 4 and all(record_problems(rec) == [] for rec in records), [record_problems(r) for r in records]
    broken = {**records[0], "rows": [{**records[0]["rows"][0], "git_sha": None, "value": "0.5"}]}
    assert record_problems(broken) == ["row 0: value '0.5' is not a number",
                                       "row 0: a finished cell's value must be a finite number, got '0.5'",
                                       "row 0: provenance missing: git_sha"]
    assert record_problems([]) == ["not a JSON object but list"]
    (rec,) = [x for x in records if x["rows"][0]["method"] == "simclr" and x["rows"][0]["protocol"] == "linear"]
    row = next(x for x in rec["rows"] if x["split"] == "test" and x["metric"] == "top1")
    cfg = tmp_path / "recorded.yaml"
    cfg.write_text(yaml.safe_dump(rec["config"]))
    again = tmp_path / "again"
    r = run_cli("--suite", row["suite"], "--config", str(cfg), "--methods", row["method"], "--protocols", row["protocol"],
                "--datasets", row["dataset"], "--seeds", str(row["seed"]), "--out", str(again))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(again / "results.csv", dtype={"value": str})  # compared as written, not as parsed floats
    rerun = df[(df.split == "test") & (df.metric == "top1")]
    (redone,) = [json.loads(p.read_text()) for p in (again / "records").rglob("*.json")]
    redone_row = next(x for x in redone["rows"] if x["split"] == "test" and x["metric"] == "top1")
    assert redone_row["value"] == row["value"] and redone_row["config_hash"] == row["config_hash"] and len(rerun) == 1

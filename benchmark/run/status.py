"""`run_benchmark.py status --out DIR`: the state of every cell of the last grid run into DIR.

A cell is `done` (a valid record: ok, collapsed or diverged), `skipped` (does not apply), `failed` (its last
attempt failed; rerunning the command retries it), `running` / `pending` (its job is in the SLURM queue), or
`waiting` (not submitted yet: its encoder is still being pretrained, or nothing runs it now). Reads only files
under DIR, plus one `sacct` call for the job states when jobs went to SLURM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.run.lock import last_run

SLURM_ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "running", "RUNNING": "running",
                "COMPLETING": "running", "SUSPENDED": "running", "RESIZING": "running"}


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> SLURM state (first word), from one `sacct` call; {} without sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        res = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(set(job_ids)))],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in res.stdout.splitlines():
        job, _, state = line.partition("|")
        if job and state:
            states[job] = state.split()[0]
    return states


def _record_state(path: Path) -> tuple[str, str]:
    """(state, detail) from a cell's record files."""
    try:
        rec = json.loads(path.read_text())
        status = rec.get("status", "")
        if status in ("ok", "collapsed", "diverged", "stopped"):
            return "done", "" if status == "ok" else status
        if status == "skipped":
            return "skipped", str(rec["rows"][0].get("flags", ""))
    except (OSError, ValueError, KeyError, IndexError):
        pass
    failed = path.with_suffix(".failed.json")
    if failed.is_file():
        try:
            row = json.loads(failed.read_text())["rows"][0]
            return "failed", f"{row.get('flags', '')} (job {row.get('job_id', '?')}, log {row.get('log') or '-'})"
        except (OSError, ValueError, KeyError, IndexError):
            return "failed", "unreadable failure record"
    return "", ""


def grid_status(out: Path) -> pd.DataFrame:
    """One row per cell of `out/grid.json`: cell, state, job_id, detail."""
    grid = out / "grid.json"
    if not grid.is_file():
        raise FileNotFoundError(f"{grid} not found: no grid was run into {out} (run_benchmark.py ... --out {out})")
    cells: list[dict[str, Any]] = json.loads(grid.read_text())["cells"]
    ledger: dict[str, dict[str, Any]] = json.loads((out / "jobs.json").read_text()) if (out / "jobs.json").is_file() else {}
    slurm_ids = [j["job_id"] for j in ledger.values() if j.get("executor") == "slurm"]
    states = slurm_states(slurm_ids)
    rows = []
    for c in cells:
        state, detail = _record_state(Path(c["record"]))
        job = ledger.get(c["cell"]) or {}
        if not state:
            pre = ledger.get(c["cell"].rsplit(" ", 1)[0]) or {}  # the cell's pretraining job
            live = SLURM_ACTIVE.get(states.get(job.get("job_id", ""), ""))
            pre_live = SLURM_ACTIVE.get(states.get(pre.get("job_id", ""), ""))
            if live:
                state, detail = live, ""
            elif job:
                state, detail = "failed", f"job {job['job_id']} ended ({states.get(job['job_id'], 'state unknown')}) without a result"
            elif pre_live:
                state, detail = "waiting", f"pretraining job {pre['job_id']} {pre_live}"
            else:
                state, detail = "waiting", "not submitted"
        rows.append({"cell": c["cell"], "state": state, "job_id": job.get("job_id", ""), "detail": detail})
    return pd.DataFrame(rows, columns=["cell", "state", "job_id", "detail"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_benchmark.py status", description="Show the state of every cell of a grid.")
    p.add_argument("--out", default="results", help="the --out folder of the run (default: results/)")
    p.add_argument("--all", action="store_true", help="list done cells too (default: only the others)")
    args = p.parse_args(argv)
    try:
        df = grid_status(Path(args.out))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = df["state"].value_counts()
    order = ["done", "skipped", "running", "pending", "waiting", "failed"]
    print(f"{args.out}: {len(df)} cells: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in order))
    line = last_run(Path(args.out))
    if line:
        print(line)
    shown = df if args.all else df[df["state"] != "done"]
    if not shown.empty:
        print(shown.to_string(index=False, max_colwidth=120))
    return 1 if counts.get("failed", 0) else 0

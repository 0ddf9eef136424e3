"""Result rows, one atomically written JSON record per finished cell, and the derived tables.

`results.csv` (tidy: one metric per row) and `leaderboard.csv` / `leaderboard.md` (pandas pivot:
method x dataset/protocol@version/metric, mean ± std over seeds) are rebuilt from the records and
never edited by hand.

A result's identity is its cell's `config_hash` (method or checkpoint, resolved configs, protocol@version, dataset
and its fingerprint, seed): two configurations never overwrite each other, and the latest attempt of one cell wins.
The leaderboard averages over seeds only within one `setting` (the cell's hash without the seed) and names a
configuration by what it changes from the suite: a pretraining change is a row (`simclr [pretrain.epochs=0]` beside
`simclr`), a protocol change a column (`digits/knn@1 [k=5]/top1` beside `digits/knn@1/top1`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.store.io import atomic_write_json, atomic_write_text, is_temp
from benchmark.store.predictions import Predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One number a protocol reports. The runner adds the provenance columns."""

    metric: str  # top1, top5, map, ...
    value: float
    split: str = "test"
    selection: str = ""  # how hyperparameters were chosen, e.g. "val top1: C=0.316"
    n_train: int | None = None
    # over a protocol's own repeats (few-shot episodes, low-shot draws), not over seeds
    ci95: float | None = None  # half-width of the 95% interval of the mean
    std: float | None = None
    min: float | None = None
    max: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the test predictions behind the value (one set shared by a protocol's rows), written beside the record
    samples: Predictions | None = field(default=None, compare=False, repr=False)


# Columns of results.csv, in order. Every record row has all of them.
COLUMNS = [
    "run_id", "method", "checkpoint", "protocol", "protocol_version", "dataset", "split", "metric", "value",
    "ci95", "std", "min", "max", "selection", "seed", "n_train", "status", "flags", "suite", "backbone", "config_hash",
    "setting", "variant", "protocol_variant", "pretrain_hash", "pretrain_setting", "dataset_fingerprint", "data_storage", "data_transform", "feature_dtype", "checkpoint_sha256", "git_sha", "git_dirty", "pretrain_git_sha",
    "pretrain_git_dirty", "torch", "python",
    "device", "effective_batch_size", "attempts", "started_at", "finished_at", "wall_s", "job_id", "log",
]
KEY = ["method", "protocol", "protocol_version", "dataset", "seed"]  # a cell up to its configuration
STATUS_ORDER = {"ok": 0, "collapsed": 1, "skipped": 2, "diverged": 3, "stopped": 4, "failed": 5}


# Filled in every row of a finished (ok / collapsed) cell: what makes its number traceable.
PROVENANCE = ["run_id", "method", "protocol", "protocol_version", "dataset", "seed", "suite", "backbone", "config_hash",
              "setting", "pretrain_hash", "pretrain_setting", "dataset_fingerprint", "git_sha", "torch", "python", "device",
              "started_at", "finished_at"]


def record_problems(record: Any) -> list[str]:
    """What makes `record` not a valid cell record (empty: valid): the schema every record the runner writes obeys."""
    if not isinstance(record, dict):
        return [f"not a JSON object but {type(record).__name__}"]
    problems = []
    status = record.get("status")
    if status not in STATUS_ORDER:
        problems.append(f"status {status!r} not one of {', '.join(STATUS_ORDER)}")
    rows = record.get("rows")
    if not isinstance(rows, list) or not rows:
        return problems + ["no rows"]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i} is not an object")
            continue
        if set(row) != set(COLUMNS):
            problems.append(f"row {i} columns differ from COLUMNS (missing {sorted(set(COLUMNS) - set(row))[:3]}, "
                            f"extra {sorted(set(row) - set(COLUMNS))[:3]})")
        if row.get("status") != status:
            problems.append(f"row {i} status {row.get('status')!r} differs from the record's {status!r}")
        if not isinstance(row.get("metric"), str) or not isinstance(row.get("seed"), int):
            problems.append(f"row {i}: metric must be a string and seed an integer")
        value = row.get("value")
        if value is not None and not isinstance(value, (int, float)):
            problems.append(f"row {i}: value {value!r} is not a number")
        if not (isinstance(row.get("config_hash"), str) and len(row["config_hash"]) == 12):
            problems.append(f"row {i}: config_hash {row.get('config_hash')!r} is not 12 hex digits")
        if status in ("ok", "collapsed"):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"row {i}: a finished cell's value must be a finite number, got {value!r}")
            missing = [c for c in PROVENANCE if row.get(c) in (None, "")]
            if missing:
                problems.append(f"row {i}: provenance missing: {', '.join(missing)}")
    if status in ("ok", "collapsed") and not isinstance(record.get("config"), dict):
        problems.append("no resolved config")
    return problems


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write one cell's record (`status`, `rows`, `meta`) atomically."""
    atomic_write_json(path, record)


def record_files(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every parseable record under `root/records` with its file; temp files skipped, unparseable ones warned about."""
    out = []
    for p in sorted((root / "records").rglob("*.json")):
        if is_temp(p):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable record %s: %s", p, e)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("rows"), list):
            out.append((p, rec))
    return out


def read_records(root: Path) -> list[dict[str, Any]]:
    """All parseable records under `root/records` (see `record_files`)."""
    return [rec for _, rec in record_files(root)]


def records_to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [r for rec in records for r in rec["rows"]]
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.empty:
        return df
    # one result per cell and metric: the latest finished attempt wins (rows written before cells were hashed: per KEY)
    legacy = df[KEY].astype(str).agg("|".join, axis=1)
    df = df.assign(_cell=df["config_hash"].where(df["config_hash"].notna(), legacy))
    df = df.sort_values(["finished_at", "run_id"]).drop_duplicates(["_cell", "split", "metric"], keep="last")
    order = df.assign(_v=_text(df["variant"]), _p=_text(df["protocol_variant"]), _s=_text(df["setting"]))
    order = order.sort_values(KEY + ["_v", "_p", "_s", "split", "metric"], kind="stable")
    return df.loc[order.index].drop(columns="_cell").reset_index(drop=True)


def fmt(mean: float, std: float, n: int, ci95: float = float("nan")) -> str:
    """'mean ± std' over seeds; one seed with the protocol's own interval: 'mean (±ci95)'."""
    if math.isnan(mean):
        return ""
    if n > 1:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{100 * mean:.2f}" + (f" (±{100 * ci95:.2f})" if not math.isnan(ci95) else "")


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: method. Columns: dataset/protocol@version/metric as 'mean ± std' (in %), then n_seeds.

    Only `split == test` rows with status ok or collapsed count; collapsed methods are flagged.
    """
    ok = df[(df["split"] == "test") & df["status"].isin(["ok", "collapsed"]) & df["value"].notna()].copy()
    if ok.empty:
        return pd.DataFrame(columns=["method"])
    ok["row"], ok["column"] = cell_labels(ok)
    g = ok.groupby(["row", "column"])["value"]
    ci = ok.assign(ci95=pd.to_numeric(ok["ci95"], errors="coerce")).groupby(["row", "column"])["ci95"].mean()
    stats = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0), "n": g.count(), "ci95": ci}).reset_index()
    stats["cell"] = [fmt(m, s, n, c) for m, s, n, c in zip(stats["mean"], stats["std"], stats["n"], stats["ci95"])]
    table = stats.pivot(index="row", columns="column", values="cell").fillna("")
    table = table[sorted(table.columns, key=_column_order)]
    table["n_seeds"] = ok.groupby("row")["seed"].nunique()
    for col in ("suite", "backbone", "device"):
        table[col] = ok.groupby("row")[col].agg(lambda v: ",".join(sorted(set(map(str, v)))))
    table["flags"] = ok.groupby("row")["flags"].agg(lambda v: ",".join(sorted({f for x in v for f in str(x).split(",") if f and f not in ("nan", "None")})))
    table.index.name = "method"
    first = [c for c in table.columns if "/" in c]
    order = _first_number(table[first[0]]) if first else None
    table = table.reset_index()
    if order is not None:
        table = table.assign(_o=order.values).sort_values(["_o", "method"], ascending=[False, True]).drop(columns="_o")
    return table.reset_index(drop=True)


def _text(col: pd.Series) -> pd.Series:
    return col.fillna("").astype(str).replace("nan", "")


def _older_tagged(label: pd.Series, groups: list[pd.Series], setting: pd.Series, finished: pd.Series) -> pd.Series:
    """`label`, except that where a group holds more than one setting, the older ones get `{hash}` appended."""
    when = finished + "|" + setting  # ties broken by the hash: deterministic
    newest = when.groupby(groups).transform("max").str.split("|").str[-1]
    return label.where(setting == newest, label + " {" + setting.str[:6] + "}")


def _column_order(column: str) -> tuple[str, bool, str]:
    """Columns sorted by dataset/protocol@version/metric, each base column before its variants and tagged settings."""
    base = re.sub(r" \[.*?\]| \{.*?\}", "", column)
    return base, column != base, column


def cell_labels(ok: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The leaderboard row and column of each result. A row is one pretrained encoder: `method [variant]`, the
    variant being what its data, pretraining or method config changes from the suite; one row per suite. A column is
    `dataset/protocol@version [protocol variant]/metric`. Where a row or column would still mix two settings (a code
    default changed between runs, a checkpoint file replaced), the newest keeps the name and the older get rows or
    columns tagged with their hash: a leaderboard never averages across configurations."""
    finished = _text(ok["finished_at"])
    variant, pvariant = _text(ok["variant"]), _text(ok["protocol_variant"])
    row = ok["method"].astype(str) + variant.map(lambda v: f" [{v}]" if v else "")
    suites = _text(ok["suite"])
    row = row.where(suites.groupby(row).transform("nunique") == 1, row + " (" + suites + ")")
    row = _older_tagged(row, [row], _text(ok["pretrain_setting"]), finished)
    # a protocol variant names its own fields: "knn.k=5" -> "k=5"
    short = [", ".join(part.split(".", 1)[-1] for part in v.split(", ")) if v else "" for v in pvariant]
    column = (ok["dataset"] + "/" + ok["protocol"] + "@" + ok["protocol_version"].astype(str)
              + pd.Series(short, index=ok.index).map(lambda v: f" [{v}]" if v else "") + "/" + ok["metric"])
    column = _older_tagged(column, [row, column], _text(ok["setting"]), finished)
    return row, column


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """Failed cells, one line per configuration, except those that a later attempt of the same method, protocol,
    dataset and seed (e.g. with a fixed config) finished."""
    good = df["status"].isin(["ok", "collapsed", "skipped"])
    last_good = df[good].groupby(KEY)["finished_at"].max().rename("last_good")
    bad = df[~good].join(last_good, on=KEY)
    bad = bad[bad["last_good"].isna() | (bad["finished_at"].astype(str) > bad["last_good"].astype(str))]
    return bad.drop_duplicates(KEY + ["config_hash"])[KEY + ["variant", "protocol_variant", "status", "flags", "job_id", "log"]].reset_index(drop=True)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: `map_k2` before `map_k16`, `top1_1pct` before `top1_10pct`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def protocol_sections(columns: list[str]) -> dict[str, list[str]]:
    """Leaderboard columns (`dataset/protocol@version [variant]/metric`) grouped by what precedes the metric, in
    column order; each section's columns in natural metric order."""
    sections: dict[str, list[str]] = {}
    for c in columns:
        if "/" in c:
            sections.setdefault(c.rsplit("/", 1)[0], []).append(c)
    return {k: sorted(v, key=lambda c: _metric_order(c.rsplit("/", 1)[1])) for k, v in sections.items()}


METRIC_ORDER = ("top1", "top5", "mean_class_acc", "map")  # the order a protocol's metrics are shown in; others after


def _metric_order(metric: str) -> tuple[int, list[Any]]:
    first = next((i for i, m in enumerate(METRIC_ORDER) if metric == m or metric.startswith(m + "_")), len(METRIC_ORDER))
    return first, natural_key(metric)


RUN_COLUMNS = ["n_seeds", "suite", "backbone", "device", "flags"]  # per leaderboard row, beside the metric columns


def _first_number(cells: pd.Series) -> pd.Series:
    return pd.to_numeric(cells.astype(str).str.split(" ").str[0].replace("", "nan"), errors="coerce")


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """One table per protocol section (methods x that protocol's metrics, best first by its first metric), then one
    table of the rows' runs (seeds, suite, backbone, device, flags)."""
    lines = [f"# {title}", ""]
    for section, cols in protocol_sections([c for c in table.columns if c != "method"]).items():
        part = table[["method", *cols]]
        part = part[(part[cols] != "").any(axis=1)]
        part = part.assign(_o=_first_number(part[cols[0]])).sort_values(["_o", "method"], ascending=[False, True], na_position="last")
        lines += [f"## {section}", "", *_markdown_rows(part.drop(columns="_o"), ["method", *(c.rsplit("/", 1)[1] for c in cols)]), ""]
    runs = ["method", *(c for c in RUN_COLUMNS if c in table.columns)]
    if len(table):
        lines += ["## runs", "", *_markdown_rows(table[runs], runs), ""]
    lines += ["Values: test-split metric in %, mean ± std over seeds (n_seeds); with one seed, (±x) is the protocol's own 95% "
              "interval over its episodes or draws. Generated by run_benchmark.py; do not edit."]
    return "\n".join(lines) + "\n"


def _markdown_rows(part: pd.DataFrame, header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in part.itertuples(index=False)]


def rebuild(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Regenerate results.csv, leaderboard.csv, leaderboard.md and failures.csv in `out`."""
    df = records_to_frame(read_records(out))
    atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.6g"))
    table = leaderboard(df)
    atomic_write_text(out / "leaderboard.csv", table.to_csv(index=False))
    made_by = ", ".join(f"{c} {'/'.join(sorted(set(','.join(table[c]).split(','))))}" for c in ("suite", "backbone", "device") if c in table)
    atomic_write_text(out / "leaderboard.md", to_markdown(table, f"sslbench leaderboard ({made_by})" if made_by else "sslbench leaderboard"))
    fails = failures(df) if not df.empty else pd.DataFrame()
    if not fails.empty:
        atomic_write_text(out / "failures.csv", fails.to_csv(index=False))
    else:
        (out / "failures.csv").unlink(missing_ok=True)
    return df, table


def row_dict(row: Row, provenance: dict[str, Any]) -> dict[str, Any]:
    d = {**provenance, **{f.name: getattr(row, f.name) for f in fields(row) if f.name not in ("extra", "samples")}}
    if row.extra:
        d["flags"] = ",".join(filter(None, [str(d.get("flags") or ""), *(f"{k}={v}" for k, v in row.extra.items())]))
    if row.n_train is None:
        d["n_train"] = provenance.get("n_train")
    return {c: d.get(c) for c in COLUMNS}

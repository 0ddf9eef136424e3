"""`run_benchmark.py report --out DIR [--out DIR ...] --to report.html`: one self-contained HTML page of the results.

Everything is inline (matplotlib figures as SVG, the table-sorting script, the styles), so the file opens offline: on
a cluster's login node, as an e-mail attachment. It shows the average rank of each leaderboard row across protocols;
per protocol a sortable table (mean ± std over seeds, 95% interval, seeds), a bar chart with 95% intervals and a
pairwise significance matrix per metric (paired bootstrap over the test images' stored predictions, Holm-corrected
within the metric); label-efficiency curves; pretraining curves from `pretrain.json`; and the provenance, failures and
skips of every cell. The numbers are those of `results.csv` (`records_to_frame`), so the report and the leaderboard
never disagree.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.errors import SSLBenchError
from benchmark.registry import PROTOCOLS
from benchmark.store.io import atomic_write_text, check_writable_file
from benchmark.store.predictions import Paired, Predictions, base_metric, holm, paired_bootstrap, record_samples
from benchmark.store.results import cell_labels, protocol_sections, record_files, records_to_frame

ALPHA = 0.05  # family-wise level of the significance marks (Holm within one metric column)
PRIMARY = ("top1", "map", "mIoU", "AP", "bbox_AP")  # a protocol's headline metric: the first of these it reports
CURVES = (("loss", "loss"), ("rankme", "RankMe"), ("std_l2", "std·√d of L2-normalised features"), ("knn_top1", "online kNN top-1"))


@dataclass
class Column:
    """One leaderboard column (`dataset/protocol@version [variant]/metric`): per row, its values over seeds."""

    name: str
    stats: pd.DataFrame  # index: row label; mean, std, n, ci_low, ci_high (fractions)
    pairs: pd.DataFrame | None = None  # square: row x row Holm-adjusted p of the paired test (NaN: no stored samples)
    deltas: pd.DataFrame | None = None  # square: row minus column, on the test images both saw


@dataclass
class Sources:
    """What the report reads: the result rows, where each row's record lies, and the pretraining histories."""

    frame: pd.DataFrame  # every result row (results.csv)
    ok: pd.DataFrame  # the test rows that count (status ok / collapsed, a value), with `row` and `column` labels
    records: dict[str, tuple[Path, dict[str, Any]]] = field(default_factory=dict)  # run_id -> (file, record)
    histories: list[dict[str, Any]] = field(default_factory=list)  # pretrain.json contents, each with its `row`
    _samples: dict[str, dict[str, Predictions]] = field(default_factory=dict)

    def samples(self, run_id: str, metric: str) -> Predictions | None:
        """The stored test predictions behind one row (None: the protocol stores none, or the file is gone)."""
        if run_id not in self._samples:
            path, rec = self.records.get(run_id, (None, None))
            self._samples[run_id] = record_samples(rec, path) if path is not None and rec is not None else {}
        return self._samples[run_id].get(metric)


def load(outs: Sequence[Path]) -> Sources:
    """The records and pretraining histories of every output folder in `outs`."""
    files = [f for out in outs for f in record_files(out)]
    frame = records_to_frame([rec for _, rec in files])
    if frame.empty:
        raise SSLBenchError(f"no result records under {', '.join(f'{o}/records' for o in outs)}: run the benchmark "
                            "with --out DIR first, then `run_benchmark.py report --out DIR`")
    ok = frame[(frame["split"] == "test") & frame["status"].isin(["ok", "collapsed"]) & frame["value"].notna()].copy()
    if not ok.empty:
        ok["row"], ok["column"] = cell_labels(ok)
    records = {str(r["run_id"]): (p, rec) for p, rec in files for r in rec["rows"][:1]}
    rows_of = ok.drop_duplicates("pretrain_hash").set_index("pretrain_hash")["row"] if not ok.empty else pd.Series(dtype=str)
    histories = []
    for out in outs:
        for p in sorted((out / "runs").glob("*/*/*/pretrain.json")):
            try:
                meta = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("history") and meta.get("pretrain_hash") in rows_of.index:
                histories.append({**meta, "row": rows_of[meta["pretrain_hash"]]})
    return Sources(frame, ok, records, histories)


# --------------------------------------------------------------------------- numbers


def seed_stats(values: pd.DataFrame) -> pd.DataFrame:
    """Per row: mean, std (ddof 1), n over seeds and the 95% interval of the mean (Student t over seeds; with one seed
    the protocol's own interval over its draws or episodes when it has one, else none)."""
    from scipy.stats import t

    g = values.groupby("row")
    stats = pd.DataFrame({"mean": g["value"].mean(), "std": g["value"].std(ddof=1), "n": g["value"].count(),
                          "own": pd.to_numeric(values["ci95"], errors="coerce").groupby(values["row"]).mean()})
    half = [t.ppf(0.975, n - 1) * s / math.sqrt(n) if n > 1 else own for n, s, own in zip(stats["n"], stats["std"], stats["own"])]
    stats["ci_low"], stats["ci_high"] = stats["mean"] - half, stats["mean"] + half
    return stats.drop(columns="own")


def significance(src: Sources, values: pd.DataFrame, metric: str, n_boot: int) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Pairwise paired tests between the rows of one column on their stored test predictions (each side averaged over
    its seeds), Holm-corrected over the column's pairs. None when fewer than two rows stored predictions."""
    per_row: dict[str, list[Predictions]] = {}
    for row, part in values.groupby("row"):
        preds = [src.samples(str(r), metric) for r in part["run_id"]]
        if preds and all(p is not None for p in preds):
            per_row[str(row)] = [p for p in preds if p is not None]
    names = sorted(per_row)
    if len(names) < 2:
        return None
    base = base_metric(metric)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    results: list[Paired | None] = []
    for a, b in pairs:
        try:
            results.append(paired_bootstrap(per_row[a], per_row[b], base, n_boot=n_boot, seed=0))
        except ValueError:  # different test images (another subset): no paired test
            results.append(None)
    tested = [r for r in results if r is not None]
    adjusted = iter(holm([r.p for r in tested]))
    p = pd.DataFrame(math.nan, index=names, columns=names)
    d = pd.DataFrame(math.nan, index=names, columns=names)
    for (a, b), r in zip(pairs, results):
        if r is not None:
            p.loc[a, b] = p.loc[b, a] = next(adjusted)
            d.loc[a, b], d.loc[b, a] = r.delta, -r.delta
    return p, d


def columns_of(src: Sources, section: list[str], n_boot: int) -> list[Column]:
    out = []
    for name in section:
        values = src.ok[src.ok["column"] == name]
        col = Column(name, seed_stats(values))
        metric = values["metric"].iloc[0]
        sig = significance(src, values, metric, n_boot)
        if sig is not None:
            col.pairs, col.deltas = sig
        out.append(col)
    return out


def headline(section: list[str]) -> list[str]:
    """The columns of a protocol's headline metric (top1, map, mIoU, AP: the first it reports, with its suffixes)."""
    metrics = {c: re.sub(r" \{.*\}$", "", c.rsplit("/", 1)[1]) for c in section}
    for base in PRIMARY:
        chosen = [c for c, m in metrics.items() if m == base or m.startswith(base + "_")]
        if chosen:
            return chosen
    return section[:1]


def average_ranks(columns: dict[str, list[Column]]) -> pd.DataFrame:
    """Rows x headline columns: the rank of each row in each (1 = best, ties averaged), then their mean."""
    ranks = {}
    for cols in columns.values():
        for col in cols:
            if col.name in headline([c.name for c in cols]):
                ranks[col.name] = col.stats["mean"].rank(ascending=False, method="average")
    table = pd.DataFrame(ranks)
    table["average rank"] = table.mean(axis=1)
    table["protocols"] = table.drop(columns="average rank").notna().sum(axis=1)
    return table.sort_values(["average rank"])


# --------------------------------------------------------------------------- figures


def _svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG text (text kept as text, no timestamp, stable ids)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)  # RDF names, not needed inline


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "sslbench", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def bar_chart(cols: list[Column], title: str) -> str:
    """Grouped bars (one group per headline metric, one bar per row) with their 95% intervals."""
    plt = _pyplot()
    rows = sorted({r for c in cols for r in c.stats.index}, key=lambda r: -cols[0].stats["mean"].get(r, -1.0))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) * len(cols) + 1.5), 2.8))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, c in enumerate(cols):
            if row in c.stats.index:
                s = c.stats.loc[row]
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(100 * s["mean"])
                lo.append(0.0 if math.isnan(s["ci_low"]) else 100 * (s["mean"] - s["ci_low"]))
                hi.append(0.0 if math.isnan(s["ci_high"]) else 100 * (s["ci_high"] - s["mean"]))
        ax.bar(xs, ys, width * 0.95, yerr=[lo, hi], capsize=2, label=row)
    ax.set_xticks(range(len(cols)), [c.name.rsplit("/", 1)[1] for c in cols])
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _svg(fig)


def efficiency_points(src: Sources) -> pd.DataFrame:
    """The rows that sit on a label-efficiency curve: dataset, row, axis ("share" or "per class"), x, metric base,
    value (seed mean), protocol."""
    points = []
    for protocol, part in src.ok.groupby("protocol"):
        try:
            where = PROTOCOLS.entry(str(protocol)).meta.get("label_efficiency")
        except SSLBenchError:  # a plugin this process has not loaded
            continue
        for (dataset, row, metric), v in part.groupby(["dataset", "row", "metric"])["value"]:
            base = base_metric(str(metric))
            if where == "suffix":
                share = re.fullmatch(rf"{base}_(\d+(?:\.\d+)?)pct", str(metric))
                shots = re.fullmatch(rf"{base}_k(\d+)", str(metric))
                if share:
                    points.append((dataset, row, "share", float(share.group(1)), base, v.mean(), protocol))
                elif shots:
                    points.append((dataset, row, "per class", float(shots.group(1)), base, v.mean(), protocol))
            elif isinstance(where, float) and metric == base:
                points.append((dataset, row, "share", 100 * where, base, v.mean(), protocol))
    return pd.DataFrame(points, columns=["dataset", "row", "axis", "x", "base", "value", "protocol"])


def efficiency_chart(points: pd.DataFrame, dataset: str) -> str:
    """Top-1 (or mAP) against the share of labels (semi-supervised, fine-tuning) and the labelled images per class
    (low-shot SVMs), one line per row."""
    plt = _pyplot()
    axes_ = [a for a in ("share", "per class") if (points["axis"] == a).any()]
    fig, axes = plt.subplots(1, len(axes_), figsize=(4.6 * len(axes_), 3.0), squeeze=False)
    for ax, axis in zip(axes[0], axes_):
        part = points[points["axis"] == axis]
        base = "top1" if (part["base"] == "top1").any() else str(part["base"].iloc[0])
        part = part[part["base"] == base]
        for row, line in part.groupby("row"):
            line = line.sort_values("x")
            ax.plot(line["x"], 100 * line["value"], marker="o", label=str(row))
        ax.set_xscale("log", base=10 if axis == "share" else 2)
        ax.set_xlabel("labelled share of train (%)" if axis == "share" else "labelled images per class")
        ax.set_ylabel(f"{base} (%)")
        ax.set_title(f"{dataset}: {', '.join(sorted(set(part['protocol'])))}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _svg(fig)


def pretraining_chart(histories: list[dict[str, Any]], dataset: str) -> str:
    """Loss, RankMe, std·√d and online kNN against the epoch, one line per row (mean over its seeds)."""
    plt = _pyplot()
    runs = [h for h in histories if h.get("dataset") == dataset]
    keys = [(k, t) for k, t in CURVES if any(k in e for h in runs for e in h["history"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for row in sorted({h["row"] for h in runs}):
            frames = [pd.DataFrame(h["history"]) for h in runs if h["row"] == row]
            # an online kNN is in every eval_every-th entry only: its line joins the epochs that have one
            curve = pd.concat(frames).groupby("epoch")[key].mean().dropna() if all(key in f for f in frames) else None
            if curve is not None and len(curve):
                ax.plot(curve.index, curve.values, marker="." if len(curve) < 30 else None, label=row)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _svg(fig)


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font: 13px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ccc; } h3 { font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; cursor: pointer; user-select: none; } td:first-child, th:first-child { text-align: left; }
th.sorted-desc::after { content: " ▼"; } th.sorted-asc::after { content: " ▲"; }
td.best { font-weight: 700; } .tie { color: #2a6; } .ci { color: #777; font-size: 11px; }
figure.chart { margin: 10px 0; } figure.chart svg { max-width: 100%; height: auto; }
td.sig { background: #e8f4ea; } td.ns { color: #999; } .note { color: #555; max-width: 900px; }
details { margin: 6px 0 12px; } summary { cursor: pointer; color: #246; }
code { background: #f4f4f4; padding: 0 3px; }
"""

# Sorting by a column's data-v values; '#layout' in the address records the charts' boxes for the browser test.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), desc = !th.classList.contains('sorted-desc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('sorted-desc', 'sorted-asc'); });
      th.classList.add(desc ? 'sorted-desc' : 'sorted-asc');
      rows.sort(function (a, b) {
        var x = a.cells[i].dataset.v, y = b.cells[i].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return desc ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
if (location.hash === '#layout') {
  var boxes = Array.from(document.querySelectorAll('figure.chart')).map(function (f) {
    var r = f.getBoundingClientRect();
    return {id: f.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
  });
  document.body.setAttribute('data-boxes', JSON.stringify(boxes));
}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _cell(value: Any, shown: str | None = None, cls: str = "") -> str:
    v = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
    return f'<td data-v="{_e(v)}"{f" class={cls!r}" if cls else ""}>{shown if shown is not None else _e(v)}</td>'


def _table(header: list[str], rows: list[str], id_: str = "", cls: str = "sortable") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    ident = f' id="{_e(id_)}"' if id_ else ""
    return f'<table class="{cls}"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _pct(x: float) -> str:
    return "" if math.isnan(x) else f"{100 * x:.2f}"


def metrics_table(cols: list[Column]) -> str:
    """Rows x the protocol's metrics: mean ± std (n seeds) and the 95% interval; the best row of each column in bold,
    rows not significantly different from it marked ≈."""
    rows = sorted({r for c in cols for r in c.stats.index}, key=lambda r: (-cols[0].stats["mean"].get(r, -1.0), r))
    body = []
    for row in rows:
        cells = [_cell(row)]
        for c in cols:
            if row not in c.stats.index:
                cells.append(_cell(None))
                continue
            s, best = c.stats.loc[row], c.stats["mean"].idxmax()
            text = _pct(s["mean"]) + (f" ± {_pct(s['std'])}" if s["n"] > 1 else "")
            interval = f'<span class="ci"> [{_pct(s["ci_low"])}, {_pct(s["ci_high"])}]</span>' if not math.isnan(s["ci_low"]) else ""
            tie = ""
            if row != best and c.pairs is not None and row in c.pairs.index and best in c.pairs.index:
                p = c.pairs.loc[row, best]
                tie = '<span class="tie" title="not significantly different from the best">≈</span>' if p >= ALPHA else ""
            cells.append(_cell(float(s["mean"]), f"{text}{interval} {tie}", "best" if row == best else ""))
        n = max(int(c.stats.loc[row, "n"]) for c in cols if row in c.stats.index)
        cells.append(_cell(n))
        body.append(f"<tr>{''.join(cells)}</tr>")
    header = ["row", *(c.name.rsplit("/", 1)[1] for c in cols), "seeds"]
    return _table(header, body, cls="sortable metrics")


def pairs_table(col: Column) -> str:
    """The pairwise matrix of one column: difference (row − column, points) and Holm-adjusted p; significant cells
    shaded."""
    assert col.pairs is not None and col.deltas is not None
    names = list(col.pairs.index)
    body = []
    for a in names:
        cells = [_cell(a)]
        for b in names:
            p, d = col.pairs.loc[a, b], col.deltas.loc[a, b]
            if a == b or math.isnan(p):
                cells.append(_cell(None, "—" if a == b else "n/a"))
            else:
                cells.append(_cell(float(d), f"{100 * d:+.2f} <span class='ci'>p={p:.3g}</span>", "sig" if p < ALPHA else "ns"))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return _table(["row − column", *names], body, cls="pairs")


def protocol_section(section: str, cols: list[Column], idx: int) -> str:
    head = headline([c.name for c in cols])
    chart = bar_chart([c for c in cols if c.name in head][:8], section)
    parts = [f'<section class="protocol" data-section="{_e(section)}"><h2>{_e(section)}</h2>', metrics_table(cols),
             f'<figure class="chart bars" id="bars-{idx}">{chart}</figure>']
    for c in cols:
        if c.pairs is not None:
            parts.append(f'<details class="significance"><summary>pairwise tests: {_e(c.name.rsplit("/", 1)[1])}</summary>'
                         f"{pairs_table(c)}</details>")
    return "".join(parts) + "</section>"


PROVENANCE = [("row", "row"), ("dataset", "dataset"), ("protocol", "protocol"), ("seed", "seed"), ("status", "status"),
              ("config_hash", "config"), ("git", "git"), ("device", "device"), ("torch", "torch"), ("python", "python"),
              ("finished_at", "finished"), ("wall_s", "wall s")]


def provenance_table(src: Sources) -> str:
    """One line per finished cell: what produced its numbers."""
    cells = src.ok.drop_duplicates("config_hash")
    body = []
    for _, r in cells.iterrows():
        dirty = r["git_dirty"] in (True, "True", "true")
        values = {**r.to_dict(), "protocol": f"{r['protocol']}@{r['protocol_version']}",
                  "git": f"{str(r['git_sha'])[:10]}{' (dirty)' if dirty else ''}"}
        body.append("<tr>" + "".join(_cell(values[k]) for k, _ in PROVENANCE) + "</tr>")
    return _table([t for _, t in PROVENANCE], body, id_="provenance")


def problems_table(src: Sources) -> str:
    """Failed, diverged, stopped and skipped cells with their reasons (never in a table above)."""
    bad = src.frame[~src.frame["status"].isin(["ok", "collapsed"])].drop_duplicates("config_hash")
    body = ["<tr>" + "".join(_cell(r[k]) for k in ("method", "dataset", "protocol", "seed", "status", "flags")) + "</tr>"
            for _, r in bad.iterrows()]
    return _table(["method", "dataset", "protocol", "seed", "status", "reason"], body, id_="problems")


def render(src: Sources, n_boot: int = 1000, title: str = "sslbench report") -> str:
    """The whole page."""
    sections = protocol_sections(sorted(set(src.ok["column"]))) if not src.ok.empty else {}
    columns = {s: columns_of(src, cols, n_boot) for s, cols in sections.items()}
    body = [f"<h1>{_e(title)}</h1>", _summary(src)]
    if columns:
        ranks = average_ranks(columns)
        rows = ["<tr>" + _cell(i) + _cell(round(float(r["average rank"]), 2)) + _cell(int(r["protocols"]))
                + "".join(_cell(None if math.isnan(v) else float(v)) for v in r.drop(["average rank", "protocols"])) + "</tr>"
                for i, r in ranks.iterrows()]
        header = ["row", "average rank", "columns", *(c for c in ranks.columns if c not in ("average rank", "protocols"))]
        body += ['<h2 id="ranks">Average rank</h2><p class="note">Rank of each row in each protocol\'s headline metric '
                 "(1 = best, ties averaged), and their mean over the columns the row has.</p>", _table(header, rows, id_="avg-rank")]
    body += [protocol_section(s, cols, i) for i, (s, cols) in enumerate(columns.items())]
    body += _curves(src)
    body += ['<h2 id="provenance-h">Provenance</h2>', provenance_table(src),
             '<h2 id="problems-h">Failures, stops and skips</h2>', problems_table(src)]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}<script>{SCRIPT}</script></body></html>\n")


def _summary(src: Sources) -> str:
    counts = src.frame.drop_duplicates("config_hash")["status"].value_counts()
    shas = sorted({str(s)[:10] for s in src.ok["git_sha"].dropna()})
    return (f"<p class='note'>{len(src.frame.drop_duplicates('config_hash'))} cells: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f". Code: {_e(', '.join(shas) or 'n/a')}. Values in %: mean ± std over seeds, [95% interval of the mean: "
            "Student t over seeds, or with one seed the protocol's own interval over its draws]. Bold: the best row of a "
            f"column; ≈: not significantly different from it (paired bootstrap over the test images' stored predictions, "
            f"each side averaged over its seeds, Holm-corrected over the column's pairs at {ALPHA}; the matrices under "
            "each table give every pair). Generated by run_benchmark.py report.</p>")


def _curves(src: Sources) -> list[str]:
    parts = []
    points = efficiency_points(src) if not src.ok.empty else pd.DataFrame()
    if not points.empty:
        parts.append('<h2 id="label-efficiency">Label efficiency</h2>')
        for i, dataset in enumerate(sorted(set(points["dataset"]))):
            parts.append(f'<figure class="chart label-efficiency" id="efficiency-{i}">{efficiency_chart(points[points["dataset"] == dataset], dataset)}</figure>')
    if src.histories:
        parts.append('<h2 id="pretraining">Pretraining</h2>')
        for i, dataset in enumerate(sorted({str(h.get("dataset")) for h in src.histories})):
            parts.append(f'<figure class="chart pretraining" id="pretraining-{i}"><figcaption>{_e(dataset)}</figcaption>'
                         f"{pretraining_chart(src.histories, dataset)}</figure>")
    return parts


def write_report(outs: Sequence[Path], to: Path, n_boot: int = 1000) -> None:
    """Render the report of `outs` to `to` atomically."""
    atomic_write_text(to, render(load(outs), n_boot))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_benchmark.py report", description="Write a self-contained HTML report of results.")
    p.add_argument("--out", action="append", required=True, metavar="DIR", help="an output folder of run_benchmark.py (repeatable)")
    p.add_argument("--to", default=None, metavar="FILE", help="the HTML file (default: report.html in the first --out)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples per paired test (default 1000)")
    return p


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    outs = [Path(o) for o in args.out]
    to = Path(args.to) if args.to else outs[0] / "report.html"
    try:
        for o in outs:
            if not (o / "records").is_dir():
                raise SSLBenchError(f"--out {o}: no records/ folder there; give a folder run_benchmark.py wrote (--out DIR)")
        if args.bootstrap < 1:
            raise SSLBenchError(f"--bootstrap must be >= 1, got {args.bootstrap}")
        check_writable_file(to, "--to")
        write_report(outs, to, args.bootstrap)
    except SSLBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {to}")
    return 0

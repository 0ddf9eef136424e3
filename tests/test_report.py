"""The HTML report as a reader meets it: written by a run, every stored prediction re-scores its row, and real
headless Chromium renders it offline (charts drawn, tables present, no network request)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from benchmark.store.predictions import base_metric, record_samples, rescore
from benchmark.store.results import record_files
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
GRID = ["--suite", "smoke", "--datasets", "digits", "--set", "data.image_size=16", "--methods", "simclr,random",
        "--protocols", "knn,linear,finetune", "--seeds", "0,1", "--set", "linear.grid_points=3",
        "--set", "finetune.epochs=1", "--set", "pretrain.epochs=2"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    r = run_cli(*GRID, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout
    return out


class Elements(HTMLParser):
    """Tags with their attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def elements(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = Elements()
    parser.feed(html)
    return parser.tags


def test_every_stored_prediction_rescores_its_row(out: Path) -> None:
    checked = 0
    for path, record in record_files(out):
        samples = record_samples(record, path)
        assert samples, f"{path} stored no predictions"
        for row in record["rows"]:
            if row["split"] == "test":
                assert rescore(samples[row["metric"]], base_metric(row["metric"])) == pytest.approx(row["value"], abs=1e-6)
                checked += 1
    assert checked == 2 * 2 * 3 * 3  # methods x seeds x protocols x (top1, top5, mean_class_acc)


def test_the_report_has_every_table_and_chart(out: Path) -> None:
    html = (out / "report.html").read_text()
    tags = elements(html)
    ids = {a.get("id") for _, a in tags}
    assert {"avg-rank", "provenance", "problems"} <= ids
    sections = [a["data-section"] for t, a in tags if t == "section"]
    assert sections == ["digits/finetune@1 [epochs=1]", "digits/knn@1", "digits/linear@1 [grid_points=3]"]
    charts = [a["class"] for t, a in tags if t == "figure"]
    assert charts.count("chart bars") == 3 and "chart label-efficiency" in charts and "chart pretraining" in charts
    assert sum(1 for t, a in tags if t == "table" and "pairs" in a.get("class", "")) == 3 * 3  # one per metric column
    assert sum(1 for t, _ in tags if t == "svg") == len(charts)
    # offline by construction: no address is fetched (the browser test below proves it)
    assert not [a for _, a in tags for k in ("src", "href") if k in a]
    assert not re.search(r"url\((?!#)|@import|https?://(?!www\.w3\.org/)", html)  # url(#id): a clip path inside the page
    # provenance: one line per finished cell with its configuration hash and code
    provenance = html[html.index('id="provenance"'):html.index('id="problems-h"')]
    hashes = {json.loads(p.read_text())["rows"][0]["config_hash"] for p in (out / "records").rglob("*.json")}
    assert all(h in provenance for h in hashes) and provenance.count("<tr>") == len(hashes) + 1


def test_report_subcommand_merges_folders_and_refuses_bad_ones(out: Path, tmp_path: Path) -> None:
    r = run_cli("report", "--out", str(out), "--out", str(out), "--to", str(tmp_path / "r.html"), "--bootstrap", "50")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").read_text().count("<section") == 3
    bad = run_cli("report", "--out", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no records/ folder" in bad.stderr


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def page_requests(netlog: Path) -> list[str]:
    """The network requests a file:// page made, from Chromium's NetLog (the browser's own background requests,
    which carry no file:// isolation key, left out)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start and "file://" in str(e.get("params", {}).get("network_isolation_key", ""))]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/test.sh installs Debian's package as root)")
def test_chromium_renders_the_report_offline(out: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = (out / "report.html").resolve()
    dom = chromium("--log-net-log=" + str(tmp_path / "net.json"), "--dump-dom", f"file://{page}#layout", profile=tmp_path / "p")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert page_requests(tmp_path / "net.json") == []
    boxes = json.loads(re.search(r'data-boxes="([^"]*)"', dom.stdout).group(1).replace("&quot;", '"'))  # type: ignore[union-attr]
    assert len(boxes) == 5  # 3 bar charts, label efficiency, pretraining
    height = int(max(b["y"] + b["h"] for b in boxes)) + 50
    shot = tmp_path / "shot.png"
    r = chromium(f"--window-size=1300,{height}", f"--screenshot={shot}", f"file://{page}", profile=tmp_path / "p")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    for b in boxes:
        region = image.crop((int(b["x"]), int(b["y"]), int(b["x"] + b["w"]), int(b["y"] + b["h"])))
        pixels = np.asarray(region, dtype=np.int64)
        drawn = float((pixels.sum(axis=2) < 600).mean())  # not white: axes, text, marks
        coloured = float((pixels.max(axis=2) - pixels.min(axis=2) > 80).mean())  # bars and lines, not grey text
        assert drawn > 0.01 and coloured > 0.0005, f"chart {b['id']} looks blank ({drawn:.3%} drawn, {coloured:.3%} coloured)"
    # the request log does see a page's fetches: the same check on a page that loads an image from a network address
    probe = tmp_path / "probe.html"
    probe.write_text('<html><body><img src="http://192.0.2.1/x.png"></body></html>')
    chromium("--log-net-log=" + str(tmp_path / "probe.json"), "--dump-dom", f"file://{probe}", profile=tmp_path / "p")
    assert page_requests(tmp_path / "probe.json") == ["http://192.0.2.1/x.png"]

"""The VOC07 SVM protocol end to end through the runner on a (synthetic, real-image) VOCdevkit tree."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.data.voc import VOC_CLASSES
from benchmark.errors import ConfigError
from benchmark.run.executor import LocalExecutor
from benchmark.run.runner import Request, plan, run
from tests.benchmark.data.test_voc import Obj, make_devkit


def _tree(tmp_path: Path) -> Path:
    def table(start: int, n: int) -> dict[str, list[Obj]]:
        return {f"{i:06d}": [(VOC_CLASSES[i % 20], (1, 1, 8, 8), False, False),
                             (VOC_CLASSES[(i + 7) % 20], (2, 2, 6, 6), i % 3 == 0, False)] for i in range(start, start + n)}

    return make_devkit(tmp_path, table(0, 100), table(100, 40))


def _request(root: Path, out: Path, protocols: tuple[str, ...]) -> Request:
    return Request(methods=("random",), protocols=protocols, datasets=("voc2007",), seeds=(0,),
                   overrides={"data": {"root": str(root), "image_size": 16, "val_fraction": 0.2},
                              "pretrain": {"backbone": "convnet_tiny", "epochs": 0},
                              "svm": {"costs": [0.1, 1.0, 10.0]}},
                   out=str(out), suite="test", progress=False)


def test_svm_on_voc2007_reports_map_and_refuses_single_label_protocols(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with pytest.raises(ConfigError, match="multi-label; protocol 'knn' needs one label per image.*svm"):
        plan(_request(root, tmp_path / "out", ("knn",)))
    out = tmp_path / "out"
    summary = run(plan(_request(root, out, ("svm",))), LocalExecutor(), out, echo=lambda *a: None)
    assert not summary.failed
    df = pd.read_csv(out / "results.csv")
    test = df[df.split == "test"].set_index("metric")
    assert list(test.index) == ["map"]  # multi-label: no top-1
    assert 0.05 < test.loc["map", "value"] <= 1.0
    assert test.loc["map", "dataset"] == "voc2007" and test.loc["map", "protocol_version"] == 1

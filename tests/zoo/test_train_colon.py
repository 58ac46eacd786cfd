"""The colorectal family (EBHI-Seg, real pathologists' masks): data, case splits, a few seeded steps, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install '.[train]')")

from tests.conftest import shared  # noqa: E402
from zoo.train import colon  # noqa: E402


@pytest.fixture(scope="module")
def ebhi() -> colon.Ebhi:
    return colon.read_ebhi(shared("ebhi-seg", "ebhi-seg.zip"))


def test_labels_splits_and_pixel_size(ebhi: colon.Ebhi) -> None:
    assert ebhi.images.shape == (2226, 224, 224, 3) and ebhi.labels.shape == (2226, 224, 224)
    groups = {c: {int(v) for v in np.unique(lab)} for lab, c in zip(ebhi.labels[::50], ebhi.categories[::50])}
    assert all(v <= {0, colon.GROUP[c]} for c, v in groups.items())  # a mask takes its image's group, nothing else
    idx = colon.case_splits(ebhi, 0)
    cases = {k: {ebhi.cases[i] for i in v} for k, v in idx.items()}
    assert not (cases["train"] & cases["select"]) and not (cases["train"] & cases["report"])  # split by case
    assert sum(len(v) for v in idx.values()) == 2226 and 0.6 < len(idx["train"]) / 2226 < 0.8
    d = colon.crypt_diameters_px(ebhi)
    assert 50 < float(np.median(d)) < 75  # ~1 um/px against 55-70 um crypts


def test_few_seeded_steps_and_export(tmp_path: Path) -> None:
    s = colon.train(tmp_path, shared("ebhi-seg", "ebhi-seg.zip"), 3, 4, 1e-3, 0, eval_every=3, limit=24)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["best_step"] == 3 and set(saved["evaluation"]) == {"select", "report"}
    assert 0 <= saved["evaluation"]["report"]["neoplasia_baseline_all_epithelium"] <= 1
    res = colon.export(tmp_path, tmp_path / "onnx", zip_path=shared("ebhi-seg", "ebhi-seg.zip"))
    assert s["parameters"] > 1e6 and res["colon-neoplasia"] < 1e-4
    # the bundled test: a Normal and an Adenocarcinoma report image, reflect-padded to the tile, and torch's output
    x, y = np.load(tmp_path / "onnx" / "test_input.npy"), np.load(tmp_path / "onnx" / "test_expected.npy")
    assert x.shape == (2, 3, 256, 256) and y.shape == (2, 3, 256, 256) and 0 <= x.min() and x.max() <= 1
    assert np.allclose(y.sum(1), 1, atol=1e-4) and res["bundled_test_max_abs_diff_onnx_vs_torch"] < 1e-4

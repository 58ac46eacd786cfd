"""What a researcher sees (issue #14): pictures, the batch summary, honest messages and help."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_zoo
from zoo.pictures import render_overview, sample_mask


def test_overview_shows_mask_legend_and_scale(tmp_path: Path) -> None:
    thumb = np.full((300, 400, 3), 200, np.uint8)
    labels = np.zeros((300, 400), np.uint8)
    labels[50:250, 40:200] = 1  # a block of class 1 on the left
    classes = [SimpleNamespace(index=0, name="Background", color=(255, 255, 255)),
               SimpleNamespace(index=1, name="Tumour", color=(220, 0, 0))]  # fmt: skip
    areas = {"Tumour": {"area_mm2": 1.234, "fraction": 0.27}}
    out = render_overview(tmp_path / "overview.png", thumb, labels, classes, 5.0, "model@1.0.0 · 5 µm/px", areas)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    h, w = img.shape[:2]
    assert w >= 800 and h >= 500
    red = (img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)  # legend swatch and outline: pure colour
    tinted = (img[..., 0] > img[..., 1] + 25) & (img[..., 0] > img[..., 2] + 25)  # translucent fill over grey
    grey = (np.abs(img[..., 0] - 200) < 6) & (np.abs(img[..., 1] - 200) < 6)
    assert red.sum() > 200, "no legend swatch or outline in the class colour"
    # the fill is where the mask is: more tinted pixels in the left part of the picture than in the right
    assert tinted[:, : w // 2].sum() > 20 * max(1, tinted[:, w // 2 :].sum() - red[:, w // 2 :].sum())
    assert grey[:, w // 2 :].sum() > 0.2 * (h * w / 2)  # the rest is the untouched thumbnail
    black = (img.sum(axis=2) < 60).sum()
    assert black > 100, "no scale bar"


def test_sample_mask_picks_nearest_rows_and_columns() -> None:
    mask = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert np.array_equal(sample_mask(mask, (5, 5), 2.0), mask[1::2, 1::2])


def test_batch_summary_csv_html_and_table(
    cmu_slide: Path, kidney_slide: Path, broken_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), str(kidney_slide),
                str(broken_slide), "--out", str(out))  # fmt: skip
    assert r.returncode == 1
    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert [Path(x["slide"]).name for x in rows] == [cmu_slide.name, kidney_slide.name, broken_slide.name]
    assert [x["status"] for x in rows] == ["ok", "ok", "failed"]
    assert "not a readable slide" in rows[2]["message"]
    assert rows[0]["model"] == "darkness@0.1.0" and rows[0]["slide_mpp_source"] == "file"
    assert rows[1]["resolution_assumed"] == "True" and "Tissue" in rows[0]["classes"]
    assert int(rows[0]["tiles_run"]) > 0 and float(rows[0]["seconds"]) > 0 and float(rows[0]["peak_rss_mb"]) > 0
    page = (out / "summary.html").read_text()
    assert page.count("<img") == 2 and f"{cmu_slide.stem}/overview.png" in page
    assert "status" in r.stdout and "failed" in r.stdout  # the printed table
    assert "no resolution metadata" in r.stderr  # kidney: assumed, said once on the console
    # a rerun lists skipped slides with their earlier figures
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), str(kidney_slide),
                "--out", str(out))  # fmt: skip
    rows = list(csv.DictReader((out / "summary.csv").open(encoding="utf-8")))
    assert [x["status"] for x in rows] == ["skipped", "skipped"] and "Tissue" in rows[0]["classes"]
    show = run_zoo("show", str(out / cmu_slide.stem), "--json")
    assert json.loads(show.stdout)["picture"].endswith("overview.png")


def test_users_summary_csv_is_not_overwritten(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("my,own,table\n")
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(out))
    assert r.returncode == 0 and (out / "summary.csv").read_text() == "my,own,table\n"
    assert "was not written by zoo" in r.stderr


def test_quiet_and_log(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out",
                str(tmp_path / "o"), "--quiet", "--log", str(log))  # fmt: skip
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert "ok:" in log.read_text()


def test_coarse_resolution_warns_when_tissue_vanishes(kidney_slide: Path, tmp_path: Path) -> None:
    r = run_zoo("run", "tissue-multires", str(kidney_slide), "--out", str(tmp_path / "o"), "--mpp", "8")
    assert r.returncode == 0
    assert "try a finer --mpp" in r.stderr


def test_inspect_says_what_is_assumed(kidney_slide: Path) -> None:
    r = run_zoo("inspect", str(kidney_slide), "--json")
    assert json.loads(r.stdout)["resolution_used"] == {"mpp": 0.5, "source": "assumed default"}
    assert "no resolution metadata" in r.stderr


def test_help_shows_each_default_once_and_reads_right() -> None:
    text = run_zoo("run", "--help").stdout
    assert "(default: None)" not in text and "--no-skip-background" not in text and "--all-tiles" in text
    for block in text.split("\n  -")[1:]:
        assert block.count("(default:") <= 1, block
    flat = " ".join(text.split())
    assert "(default: as many pixels as 8 tiles of 256 px" in flat and "(default: out)" in flat


def test_info_is_a_readable_card() -> None:
    r = run_zoo("info", "tissue-multires")
    assert r.returncode == 0
    for needle in ("classes:", "input:", "weights:", "licence:", "Tissue", "µm/px"):
        assert needle in r.stdout
    assert "seed 000" not in r.stdout and not r.stdout.lstrip().startswith("{")


def test_missing_dask_names_the_extra(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "dask").mkdir(parents=True)
    (fake / "dask" / "__init__.py").write_text("raise ImportError('No module named dask')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(tmp_path / "o"),
                "--workers", "2", env=env)  # fmt: skip
    assert r.returncode == 1 and "pip install 'pathology-zoo[dask]'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--device", "0"], ["--providers", "CUDAExecutionProvider"]])
def test_gpu_requests_without_cuda_are_errors(args: list[str], cmu_slide: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the error path is not reachable")
    r = run_zoo("run", "tissue-multires", str(cmu_slide), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 1 and "pip install" in r.stderr and not (tmp_path / "o").exists()

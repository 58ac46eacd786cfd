"""A pathologist's edit in QuPath round-trips into a corrected mask with a per-class report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapely.geometry import box, mapping, shape

from tests.conftest import run_zoo
from zoo.outputs import read_mask_tiff

NO_SIMPLIFY = ("--simplify-um", "0", "--min-area-um2", "0")


def test_zoo_edits_reports_added_and_removed(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reg = ("--registry", str(darkness_registry))
    run = run_zoo(*reg, "run", "darkness", str(cmu_slide), "--out", str(out), "--no-progress", *NO_SIMPLIFY)
    assert run.returncode == 0, run.stderr
    res = out / cmu_slide.stem
    fc = json.loads((res / "annotations.geojson").read_text())
    # The pathologist deletes the largest object and draws a new square on glass (top-left corner).
    feats = sorted(fc["features"], key=lambda f: shape(f["geometry"]).area)
    removed = feats.pop()
    added = box(40, 40, 440, 440)  # level-0 px; the slide corner is glass
    feats.append(
        {
            "type": "Feature",
            "geometry": mapping(added),
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
        }
    )
    edited = tmp_path / "edited.geojson"
    edited.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    r = run_zoo("edits", str(res), str(edited), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["changes"]["classes"]["Tissue"]
    assert rep["added_um2"] == pytest.approx(added.area * 0.499**2, rel=0.05)
    assert rep["removed_um2"] == pytest.approx(shape(removed["geometry"]).area * 0.499**2, rel=0.05)
    assert 0 < rep["dice"] < 1
    assert (res / "edits.png").stat().st_size > 10_000 and json.loads(r.stdout)["picture"].endswith("edits.png")
    fixed, mpp, meta = read_mask_tiff(res / "corrected.tiff")
    pred, _, _ = read_mask_tiff(res / "mask.tiff")
    ds = meta["downsample"]
    assert fixed.shape == pred.shape and mpp == pytest.approx(0.499 * ds)
    assert fixed[int(100 / ds), int(100 / ds)] == 1 and pred[int(100 / ds), int(100 / ds)] == 0


def test_convert_mask_to_geojson_and_back(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reg = ("--registry", str(darkness_registry))
    run_zoo(*reg, "run", "darkness", str(cmu_slide), "--out", str(out), "--format", "tiff", "--no-progress", check=True)
    mask = out / cmu_slide.stem / "mask.tiff"
    gj = tmp_path / "a.geojson"
    r = run_zoo("convert", str(mask), "--to", "geojson", "--out", str(gj), *NO_SIMPLIFY)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "b.tiff"
    r = run_zoo("convert", str(gj), "--to", "tiff", "--like", str(mask), "--out", str(back))
    assert r.returncode == 0, r.stderr
    a, _, _ = read_mask_tiff(mask)
    b, _, _ = read_mask_tiff(back)
    assert (a == b).all()


def test_convert_annotations_drawn_from_scratch_onto_a_slide(cmu_slide: Path, tmp_path: Path) -> None:
    """Issue #13: annotations drawn in QuPath on a slide that was never run become a training mask."""
    feats = [
        {
            "type": "Feature",
            "id": "a",
            "geometry": mapping(box(200, 300, 1000, 900)),
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "id": "b",
            "geometry": mapping(box(1200, 1200, 1800, 2600)),
            "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 0, 200]}},
        },
    ]
    gj = tmp_path / "drawn.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "train-mask.tiff"
    r = run_zoo("convert", str(gj), "--to", "tiff", "--like", str(cmu_slide), "--mpp", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    mask, mpp, meta = read_mask_tiff(out)
    assert mpp == pytest.approx(0.499 * 4) and meta["downsample"] == 4
    assert [c["name"] for c in meta["classes"]] == ["Background", "Tumor", "Stroma"]
    assert mask.shape == (-(-2967 // 4), -(-2220 // 4))
    assert (mask == 1).sum() == pytest.approx(800 * 600 / 16, rel=0.02)
    assert (mask == 2).sum() == pytest.approx(600 * 1400 / 16, rel=0.02)
    assert mask[10, 10] == 0 and mask[100, 100] == 1 and mask[400, 375] == 2

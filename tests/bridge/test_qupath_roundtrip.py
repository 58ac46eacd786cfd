"""What QuPath 0.5.1, 0.6.0 and 0.7.0 wrote back after importing the project's GeoJSON (issue #13).

The files in ``shared/data/qupath/reexports/`` are QuPath's own ``exportObjectsAsGeoJSON`` after
its own ``readObjects`` of the project's output (see that folder's README). Reading them back
must give exactly the objects the project wrote: same ids, classes, colours, object types and
geometry, in every version; the lossless export rasterises to the model's mask pixel for pixel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely

from bridge.geojson import parse_qupath_geojson, rasterize_annotations, read_qupath_geojson
from tests.conftest import SHARED, run_zoo, shared

VERSIONS = ("0.5.1", "0.6.0", "0.7.0")
ZOO_OUTPUTS = [
    "out_cmu-1-small-region",
    "out-lossless_cmu-1-small-region",
    "out-det_cmu-1-small-region",
    "out_kidney-48-5",
    "out_tcga-cr-7395-01a-01-ts1",
]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _reexport(version: str, name: str) -> Path:
    return shared("qupath", "reexports", f"qupath-{version}_{name}.geojson")


@pytest.mark.parametrize("name", ZOO_OUTPUTS)
def test_zoo_outputs_come_back_identical_from_every_qupath_version(name: str) -> None:
    reports = {v: read_qupath_geojson(_reexport(v, name)) for v in VERSIONS}
    first = reports[VERSIONS[0]]
    for v, rep in reports.items():
        assert rep.rejected == [] and rep.repaired == 0, (v, rep.rejected)
        assert len(rep.annotations) == rep.total > 0
        ids = [a.id for a in rep.annotations]
        assert all(i and UUID.match(i) for i in ids) and len(set(ids)) == len(ids)
        for a, b in zip(rep.annotations, first.annotations):
            assert a.id == b.id and a.class_name == "Tissue" and a.color == (0, 160, 0)
            assert a.object_type == ("detection" if name.startswith("out-det") else "annotation")
            assert a.geometry.is_valid and shapely.symmetric_difference(a.geometry, b.geometry).area == 0
            meas = a.properties.get("measurements", {})
            assert meas["Area µm^2"] == pytest.approx(a.geometry.area * _mpp(name) ** 2, rel=1e-3)


def _mpp(name: str) -> float:
    return 0.499 if "cmu" in name else 0.5  # TCGA and kidney have none: 0.5 µm/px assumed


def test_lossless_export_rasterises_to_the_models_mask(cmu_slide: Path, tmp_path: Path) -> None:
    """QuPath's re-export of `--simplify-um 0 --min-area-um2 0` output is the model's mask, pixel for pixel."""
    from zoo.outputs import read_mask_tiff

    out = tmp_path / "out"
    r = run_zoo(
        "run", "tissue-multires", str(cmu_slide), "--out", str(out), "--simplify-um", "0", "--min-area-um2", "0",
        "--engine", "onnxruntime", "--precision", "fp32",  # the reference the exports were made with
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    mask, _, meta = read_mask_tiff(out / cmu_slide.stem / "mask.tiff")
    for v in VERSIONS:
        rep = read_qupath_geojson(_reexport(v, "out-lossless_cmu-1-small-region"))
        back = rasterize_annotations(rep.annotations, {"Tissue": 1}, mask.shape, meta["downsample"])
        assert np.array_equal(back, mask), f"QuPath {v}: {(back != mask).sum()} pixels differ"


@pytest.mark.parametrize("name", ["histoqc_qupath02_multipolygon_example", "histoqc_qupath03plus_holed"])
def test_real_exports_survive_qupath_reimport(name: str) -> None:
    original_name = "histoqc_qupath02_multipolygon_example.json" if "02" in name else f"{name}.geojson"
    original = read_qupath_geojson(shared("qupath", original_name))
    for v in VERSIONS:
        rep = read_qupath_geojson(_reexport(v, name))
        assert rep.rejected == [] and len(rep.annotations) == len(original.annotations)
        for a, b in zip(rep.annotations, original.annotations):
            assert a.class_label == b.class_label and a.color == b.color
            assert shapely.symmetric_difference(a.geometry, b.geometry).area < 1e-6 * max(1.0, b.geometry.area)


@pytest.mark.parametrize("slide_name", ["cmu-1-small-region.svs", "kidney-48-5.tif", "tcga-cr-7395-01a-01-ts1.svs"])
@pytest.mark.parametrize("lossless", [False, True])
def test_untouched_export_reports_zero_change(slide_name: str, lossless: bool, tmp_path: Path) -> None:
    slide = shared("slides", slide_name)
    out = tmp_path / "out"
    opts = ["--simplify-um", "0", "--min-area-um2", "0"] if lossless else []
    assert run_zoo("run", "tissue-multires", str(slide), "--out", str(out), *opts).returncode == 0
    res = out / slide.stem
    untouched = tmp_path / "qupath-export.geojson"  # QuPath re-exports geometry unchanged (see the README there)
    untouched.write_text((res / "annotations.geojson").read_text())
    r = run_zoo("edits", str(res), str(untouched), "--json", "--out", str(tmp_path / "corrected.tiff"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["baseline"] == "exported GeoJSON"
    assert rep["changes"]["pixels_changed"] == 0
    assert all(c["added_um2"] == 0 and c["removed_um2"] == 0 for c in rep["changes"]["classes"].values())
    if lossless:
        assert rep["vs_model_mask"]["pixels_changed"] == 0


def test_class_map_globs_and_unclassified(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reg = ("--registry", str(darkness_registry))
    assert run_zoo(*reg, "run", "darkness", str(cmu_slide), "--out", str(out)).returncode == 0
    res = out / cmu_slide.stem
    fc = json.loads((res / "annotations.geojson").read_text())
    for k, f in enumerate(fc["features"]):  # QuPath users' own classes, and objects left unclassified
        if k % 2:
            f["properties"]["classification"] = {"name": f"Region {k}", "color": [1, 2, 3]}
        else:
            del f["properties"]["classification"]
    edited = tmp_path / "e.geojson"
    edited.write_text(json.dumps(fc))
    r = run_zoo("edits", str(res), str(edited), "--json")
    assert r.returncode == 1 and "Unclassified" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_zoo("edits", str(res), str(edited), "--json", "--class-map", "Region*=Tissue", "Unclassified=Tissue")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["changes"]["pixels_changed"] == 0
    imp = rep["import"]
    assert imp["kept"] == imp["features"] == len(fc["features"]) and imp["rejected"] == 0
    r = run_zoo("edits", str(res), str(edited), "--json", "--class-map", "Region*=Tissue", "--force")
    imp = json.loads(r.stdout)["import"]
    assert imp["kept"] + imp["rejected"] == imp["features"] and imp["rejected"] > 0


def test_nothing_usable_is_an_error(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        run_zoo("--registry", str(darkness_registry), "run", "darkness", str(cmu_slide), "--out", str(out)).returncode
        == 0
    )
    bad = tmp_path / "bad.geojson"
    line = {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "properties": {}}
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [line, line]}))
    r = run_zoo("edits", str(out / cmu_slide.stem), str(bad))
    assert r.returncode == 1 and "none of its 2 feature(s) is usable" in r.stderr
    assert not (out / cmu_slide.stem / "corrected.tiff").exists()


def test_parse_counts_add_up() -> None:
    doc = json.loads(shared("qupath", "histoqc_qupath02_multipolygon_example.json").read_text())
    rep = parse_qupath_geojson(doc)
    assert len(rep.annotations) + len(rep.rejected) == rep.total == len(doc)
    assert SHARED.exists()


# --------------------------------------------------------------------- every model, the TCGA slide (issue 22, 5 and 6)


def _registered() -> list[str]:
    from zoo.registry import load_registry

    return sorted({m.name for m in load_registry().models})


@pytest.mark.slow
@pytest.mark.parametrize("model", _registered())
def test_every_models_geojson_is_valid_and_comes_back(model: str, tmp_path: Path) -> None:
    """Each model's default output on the TCGA frozen section: every written geometry valid (also after the
    default 2 µm simplification and rounding to 0.01 px), and `zoo edits`/`zoo convert` read every feature
    back, QuPath's ``Ignore*`` included (it maps to the class whose ``qupath_name`` it is)."""
    from shapely.geometry import shape

    from zoo.outputs import read_mask_tiff
    from zoo.registry import load_registry

    slide = shared("slides", "tcga-cr-7395-01a-01-ts1.svs")
    out = tmp_path / "out"
    r = run_zoo("run", model, str(slide), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = out / slide.stem
    fc = json.loads((res / "annotations.geojson").read_text())
    for f in fc["features"]:
        g = shape(f["geometry"])
        assert g.is_valid, (f["properties"]["classification"], shapely.is_valid_reason(g))
    entry = load_registry().get(model)
    written = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in fc["features"]}  # fmt: skip
    for c in entry.classes:
        if c.qupath_name == "Ignore*" and "Ignore*" in written:
            assert written["Ignore*"] == (180, 180, 180)  # QuPath's own colour for Ignore*: zoo's pictures match it
    untouched = tmp_path / "qupath-export.geojson"
    untouched.write_text((res / "annotations.geojson").read_text())
    r = run_zoo("edits", str(res), str(untouched), "--json", "--out", str(tmp_path / "corrected.tiff"))
    if not fc["features"]:
        assert r.returncode == 1 and "none of its 0 feature(s)" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["import"]["rejected"] == 0 and rep["changes"]["pixels_changed"] == 0, rep["import"]
    fixed, _, _ = read_mask_tiff(tmp_path / "corrected.tiff")
    for c in entry.foreground:
        if c.qupath_name and c.qupath_name in written:
            assert (fixed == c.index).any(), f"{c.name} ({c.qupath_name}) lost in the corrected mask"
    r = run_zoo(
        "convert", str(untouched), "--to", "tiff", "--like", str(res / "mask.tiff"), "--out", str(tmp_path / "c.tiff")
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rejected"] == 0

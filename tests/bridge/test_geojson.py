"""Masks <-> QuPath GeoJSON, checked against real QuPath exports (0.2 and 0.3+ styles)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, shape

from bridge.edits import dice
from bridge.geojson import (
    ClassStyle,
    argb_to_rgb,
    mask_to_feature_collection,
    mask_to_polygons,
    parse_qupath_geojson,
    rasterize_annotations,
    read_qupath_geojson,
)
from tests.conftest import shared
from zoo.errors import GeoJSONError

TISSUE = ClassStyle(1, "Tissue", (0, 160, 0))
TUMOR = ClassStyle(2, "Tumor", (200, 0, 0))


def ring_mask() -> np.ndarray:
    m = np.zeros((60, 80), np.uint8)
    m[10:50, 10:70] = 1
    m[20:40, 30:50] = 0  # hole
    m[25:30, 35:40] = 2  # island of another class inside the hole
    return m


def test_polygons_have_holes_and_level0_coordinates() -> None:
    polys = mask_to_polygons(ring_mask(), downsample=4.0)
    (ring,) = polys[1]
    assert len(ring.interiors) == 1
    assert ring.area == pytest.approx((40 * 60 - 20 * 20) * 16)
    assert ring.bounds == (40.0, 40.0, 280.0, 200.0)
    (island,) = polys[2]
    assert island.area == pytest.approx(25 * 16)


def test_feature_collection_follows_qupath_conventions() -> None:
    fc = mask_to_feature_collection(ring_mask(), [TISSUE, TUMOR], downsample=2.0, mpp0=0.5)
    real = json.loads(shared("qupath", "histoqc_qupath03plus_holed.geojson").read_text())
    for f in fc["features"]:
        assert set(f) == set(real)  # type, id, geometry, properties
        assert set(real["properties"]) <= set(f["properties"]) | {"measurements"}
        assert f["properties"]["objectType"] == real["properties"]["objectType"] == "annotation"
        cls = f["properties"]["classification"]
        assert set(cls) == {"name", "color"} and len(cls["color"]) == 3
        assert f["properties"]["isLocked"] is False
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
    tissue = next(f for f in fc["features"] if f["properties"]["classification"]["name"] == "Tissue")
    assert tissue["properties"]["measurements"]["Area µm^2"] == pytest.approx((2400 - 400) * 4 * 0.25)


def test_detections_and_merge() -> None:
    fc = mask_to_feature_collection(ring_mask(), [TISSUE], object_type="detection", merge=True)
    (f,) = fc["features"]
    assert f["properties"]["objectType"] == "detection" and f["geometry"]["type"] == "MultiPolygon"


def test_import_qupath_03_single_feature_with_hole() -> None:
    path = shared("qupath", "histoqc_qupath03plus_holed.geojson")
    rep = read_qupath_geojson(path)
    (a,) = rep.annotations
    assert a.object_type == "annotation" and isinstance(a.geometry, Polygon)
    assert len(a.geometry.interiors) == 1
    raw = shape(json.loads(path.read_text())["geometry"])
    assert a.geometry.area == pytest.approx(raw.area) and a.geometry.area < Polygon(a.geometry.exterior).area


def test_import_qupath_02_array_with_colorrgb() -> None:
    rep = read_qupath_geojson(shared("qupath", "histoqc_qupath02_multipolygon_example.json"))
    assert rep.summary()["kept"] == 2 and not rep.rejected
    names = {a.class_name for a in rep.annotations}
    assert names == {"Tumor", "Invborder"}
    tumor = next(a for a in rep.annotations if a.class_name == "Tumor")
    assert tumor.color == argb_to_rgb(-3670016) == (200, 0, 0)
    assert tumor.geometry.geom_type == "MultiPolygon" and tumor.geometry.is_valid


def test_rasterise_real_export_matches_geometry_area() -> None:
    rep = read_qupath_geojson(shared("qupath", "histoqc_qupath03plus_holed.geojson"))
    g = rep.annotations[0].geometry
    ds = 16.0
    shape_px = (int(g.bounds[3] / ds) + 2, int(g.bounds[2] / ds) + 2)
    m = rasterize_annotations(rep.annotations, {"Unclassified": 1}, shape_px, ds)
    assert m.sum() * ds * ds == pytest.approx(g.area, rel=0.03)


def test_round_trip_on_real_model_output(cmu_slide: Path, tmp_path: Path) -> None:
    """mask -> GeoJSON -> mask on the bundled model's real prediction, holes included."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import load_registry, verified_weights
    from zoo.runner import RunOptions, predict_slide
    from zoo.slide import open_slide

    reg = load_registry()
    entry = reg.get(None)
    with open_slide(cmu_slide) as s:
        pred = predict_slide(s, OnnxModel(verified_weights(entry, reg), entry), RunOptions(progress=False))
    mask = pred.mask.to_array()
    exact = mask_to_feature_collection(mask, [TISSUE], pred.downsample, mpp0=0.499)
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in exact["features"]), "expected polygons with holes"
    doc = json.loads(json.dumps(exact))  # through text, as a file would be
    rep = parse_qupath_geojson(doc)
    back = rasterize_annotations(rep.annotations, {"Tissue": 1}, mask.shape, pred.downsample)
    assert np.array_equal(back, mask)  # lossless without simplification
    simplified = mask_to_feature_collection(mask, [TISSUE], pred.downsample, 0.499, simplify_um=2.0, min_area_um2=500)
    back = rasterize_annotations(
        parse_qupath_geojson(simplified).annotations, {"Tissue": 1}, mask.shape, pred.downsample
    )
    assert dice(back == 1, mask == 1) > 0.98


def test_bad_input_keeps_valid_features(tmp_path: Path) -> None:
    good = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
    }
    bowtie = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]},
        "properties": {"classification": {"name": "Tissue"}},
    }
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}
    outside = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[500, 500], [600, 500], [600, 600], [500, 500]]]},
        "properties": {"classification": {"name": "Tissue"}},
    }
    partly = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[90, 90], [150, 90], [150, 150], [90, 90]]]},
        "properties": {"classification": {"name": "Tissue"}},
    }
    unknown = {**good, "properties": {"classification": {"name": "Stroma"}}}
    nogeom = {"type": "Feature", "properties": {}}
    doc = {"type": "FeatureCollection", "features": [good, bowtie, point, outside, partly, unknown, nogeom]}
    rep = parse_qupath_geojson(doc, bounds_px=(100, 100))
    s = rep.summary()
    assert s["kept"] == 4 and s["rejected"] == 3 and s["repaired"] == 1 and s["clipped"] == 1
    assert all(a.geometry.is_valid for a in rep.annotations)
    assert any("Point" in r for r in rep.rejected) and any("outside the slide" in r for r in rep.rejected)
    m = rasterize_annotations(rep.annotations, {"Tissue": 1}, (100, 100), 1.0, report=rep)
    assert m.sum() > 0 and any("Stroma" in r and "--class-map" in r for r in rep.rejected)


def test_invalid_json_and_wrong_document(tmp_path: Path) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(GeoJSONError, match="not valid JSON") as exc:
        read_qupath_geojson(bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(GeoJSONError, match="not GeoJSON annotations"):
        parse_qupath_geojson({"hello": "world"}, "x.json")
    with pytest.raises(GeoJSONError, match="no such file"):
        read_qupath_geojson(tmp_path / "absent.geojson")


def test_non_finite_coordinates_reject_only_that_feature(tmp_path: Path) -> None:
    """Issue #10.10: one NaN/Infinity coordinate used to abort the import with a GEOSException."""
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    props = {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}}
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": props},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 0], [5, 5], [0, 0]]]},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [float("inf"), 0], [5, 5], [0, 0]]]},
        },
    ]
    path = tmp_path / "nan.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))  # writes NaN / Infinity, as Java does
    rep = read_qupath_geojson(path)
    assert len(rep.annotations) == 1 and len(rep.rejected) == 2
    assert all("NaN or infinite" in r for r in rep.rejected)


def test_qupath_names_map_back_literally() -> None:
    """``Ignore*`` (QuPath's class for regions to leave out) maps back to the class whose qupath_name it is, as a
    name: not as a glob that would swallow 'Ignore me' too (issue 22, item 5)."""
    from bridge.edits import class_lookup
    from bridge.geojson import class_value

    classes = [ClassStyle(0, "Background", (255, 255, 255)), ClassStyle(3, "Exclude", (180, 180, 180), "Ignore*")]
    lookup = class_lookup(classes)
    assert class_value("Ignore*", lookup) == 3 and class_value("Exclude", lookup) == 3
    assert class_value("Ignore me", lookup) is None
    assert (
        ClassStyle.from_meta({"index": 3, "name": "Exclude", "color": [180, 180, 180], "qupath_name": "Ignore*"})
        == classes[1]
    )

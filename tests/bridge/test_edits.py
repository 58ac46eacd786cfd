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


# --------------------------------------------------------------------------- never onto an input (issue 22, 1)


def _hashes(*paths: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.fixture()
def darkness_result(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> Path:
    """A `zoo run darkness` result folder on a copy of the bundled slide (the copy may be named as --out)."""
    import shutil

    slide = tmp_path / "slide.svs"
    shutil.copy(cmu_slide, slide)
    out = tmp_path / "out"
    r = run_zoo("--registry", str(darkness_registry), "run", "darkness", str(slide), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out / "slide"


def test_convert_and_edits_never_write_onto_their_inputs(darkness_result: Path, tmp_path: Path) -> None:
    """Every input named as --out is refused with one line, exit 1, and every input keeps its bytes."""
    slide, mask, gj = tmp_path / "slide.svs", darkness_result / "mask.tiff", darkness_result / "annotations.geojson"
    edited = tmp_path / "edited.geojson"
    edited.write_text(gj.read_text())
    inputs = [slide, mask, gj, edited]
    before = _hashes(*inputs)
    attempts = [
        ["convert", str(gj), "--to", "tiff", "--like", str(slide), "--mpp", "2", "--out", str(slide)],
        ["convert", str(gj), "--to", "tiff", "--like", str(mask), "--out", str(mask)],
        ["convert", str(gj), "--to", "tiff", "--like", str(mask), "--out", str(gj)],
        ["convert", str(mask), "--to", "geojson", "--out", str(mask)],
        ["edits", str(darkness_result), str(edited), "--out", str(edited)],
        ["edits", str(darkness_result), str(edited), "--out", str(mask)],
        ["edits", str(mask), str(edited), "--baseline", str(gj), "--out", str(gj)],
    ]
    for args in attempts:
        for force in ([], ["--force"]):  # --force never makes an input writable
            r = run_zoo(*args, *force)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1 and "input of this command" in r.stderr, r.stderr
    assert _hashes(*inputs) == before


def test_existing_files_are_kept_unless_force(darkness_result: Path, tmp_path: Path) -> None:
    gj, mask = darkness_result / "annotations.geojson", darkness_result / "mask.tiff"
    edited = tmp_path / "edited.geojson"
    edited.write_text(gj.read_text())
    out = tmp_path / "elsewhere" / "fixed.tiff"
    out.parent.mkdir()
    unrelated = out.with_name("edits.png")
    unrelated.write_bytes(b"a picture of the user's own")
    r = run_zoo("edits", str(darkness_result), str(edited), "--out", str(out))
    assert r.returncode == 1 and "edits.png: exists already" in r.stderr and "--force" in r.stderr
    assert not out.exists() and unrelated.read_bytes() == b"a picture of the user's own"  # nothing half-written
    r = run_zoo("edits", str(darkness_result), str(edited), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert f"replaced {unrelated}" in r.stderr and out.exists() and unrelated.read_bytes()[:4] == b"\x89PNG"
    prior = tmp_path / "prior.geojson"
    prior.write_text("the user's file")
    r = run_zoo("convert", str(mask), "--to", "geojson", "--out", str(prior))
    assert r.returncode == 1 and prior.read_text() == "the user's file"
    r = run_zoo("convert", str(mask), "--to", "geojson", "--out", str(prior), "--force")
    assert r.returncode == 0 and json.loads(prior.read_text())["type"] == "FeatureCollection"
    assert not [p for p in tmp_path.rglob("*.partial")]


def test_edits_by_default_never_replace_an_earlier_correction(darkness_result: Path, tmp_path: Path) -> None:
    edited = tmp_path / "edited.geojson"
    edited.write_text((darkness_result / "annotations.geojson").read_text())
    assert run_zoo("edits", str(darkness_result), str(edited)).returncode == 0
    first = _hashes(darkness_result / "corrected.tiff", darkness_result / "edits.png")
    r = run_zoo("edits", str(darkness_result), str(edited))
    assert r.returncode == 1 and "corrected.tiff: exists already" in r.stderr
    assert _hashes(darkness_result / "corrected.tiff", darkness_result / "edits.png") == first


# --------------------------------------------------------------------------- broken GeoJSON (issue 22, 7)


def _square(props: object, geometry: object = None) -> dict[str, object]:
    return {"type": "Feature", "geometry": geometry or mapping(box(40, 40, 440, 440)), "properties": props}


BAD_FEATURES = {
    "name-int": _square({"classification": {"name": 7, "color": [0, 160, 0]}}),
    "name-list": _square({"classification": {"name": ["Tissue"], "color": [0, 160, 0]}}),
    "colour-names": _square({"classification": {"name": "Tissue", "color": ["red", "green", "blue"]}}),
    "properties-list": _square(["Tissue"]),
    "classification-text": _square({"classification": "Tissue"}),
    "circle": _square({"classification": {"name": "Tissue"}}, {"type": "Circle", "coordinates": [5, 5], "radius": 3}),
    "coordinates-text": _square({"classification": {"name": "Tissue"}}, {"type": "Polygon", "coordinates": "abc"}),
}


@pytest.mark.parametrize("command", ["edits", "convert"])
def test_bad_features_are_rejected_and_counted_never_a_traceback(
    command: str, darkness_result: Path, tmp_path: Path
) -> None:
    good = _square({"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}})
    doc = {"type": "FeatureCollection", "features": [good, *BAD_FEATURES.values()]}
    f = tmp_path / "odd.geojson"
    f.write_text(json.dumps(doc))
    mask = darkness_result / "mask.tiff"
    args = (
        ["edits", str(darkness_result), str(f), "--json"]
        if command == "edits"
        else ["convert", str(f), "--to", "tiff", "--like", str(mask), "--out", str(tmp_path / "c.tiff")]
    )
    r = run_zoo(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    imp = json.loads(r.stdout)["import"] if command == "edits" else json.loads(r.stdout)
    assert imp["kept"] == 1 and imp["rejected"] == len(BAD_FEATURES) and imp["features"] == 1 + len(BAD_FEATURES)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        "not json at all",
        '{"type": "FeatureCollection", "features": {"a": 1}}',
        "\x00\xff",
    ],
)
def test_a_file_that_is_not_geojson_is_one_line(text: str, darkness_result: Path, tmp_path: Path) -> None:
    f = tmp_path / "x.geojson"
    f.write_bytes(text.encode("latin-1"))
    mask, dest = str(darkness_result / "mask.tiff"), str(tmp_path / "o.tiff")
    for args in (
        ["edits", str(darkness_result), str(f)],
        ["convert", str(f), "--to", "tiff", "--like", mask, "--out", dest],
    ):
        r = run_zoo(*args)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(f) in r.stderr
    assert not (tmp_path / "o.tiff").exists() and not (darkness_result / "corrected.tiff").exists()

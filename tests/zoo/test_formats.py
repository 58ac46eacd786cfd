"""DICOM WSI and OME-TIFF (issue #14): found in folders, read, and their results line up with the SVS's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bridge.edits import dice
from tests.conftest import run_zoo
from zoo.outputs import read_mask_tiff


def _run(registry: Path, slide: Path, out: Path) -> tuple[np.ndarray, dict[str, object], dict[str, object]]:
    r = run_zoo("--registry", str(registry), "run", "darkness", str(slide), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = Path(json.loads(r.stdout)[0]["out"])
    mask, _, meta = read_mask_tiff(res / "mask.tiff")
    return mask, meta, json.loads((res / "run.json").read_text())


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled CMU slide converted to a DICOM WSI series by wsidicomizer (a folder of .dcm files)."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer not installed (pip install '.[dev]')")
    from wsidicomizer.sources import TiffSlideSource

    from zoo.cli import bundled_slide

    out = tmp_path_factory.mktemp("dicom") / "cmu-dicom"
    wsidicomizer.WsiDicomizer.convert(
        bundled_slide(), out, preferred_source=TiffSlideSource, tile_size=256,
        include_label=False, include_overview=False, include_thumbnail=False,
    )  # fmt: skip
    return out


def test_dicom_series_is_one_slide_and_lines_up(
    dicom_folder: Path, cmu_slide: Path, darkness_registry: Path, tmp_path: Path
) -> None:
    from zoo.jobs import expand_slides

    parent = tmp_path / "slides"
    parent.mkdir()
    shutil.copytree(dicom_folder, parent / "case-dicom")
    shutil.copy(cmu_slide, parent / "case-svs.svs")
    assert [p.name for p in expand_slides([str(parent)])] == ["case-dicom", "case-svs.svs"]
    assert expand_slides([str(parent / "case-dicom")]) == [parent / "case-dicom"]
    r = run_zoo("inspect", str(parent / "case-dicom"), "--json")
    info = json.loads(r.stdout)
    assert info["backend"] == "openslide" and info["mpp"] == pytest.approx(0.499)
    ref, ref_meta, _ = _run(darkness_registry, cmu_slide, tmp_path / "o1")
    got, meta, run = _run(darkness_registry, parent / "case-dicom", tmp_path / "o2")
    assert Path(run["slide"]["path"]).name == "case-dicom" and (tmp_path / "o2" / "case-dicom").is_dir()
    # same grid in level-0 coordinates; pixels re-encoded by the converter, so nearly (not bit-) identical
    assert meta["downsample"] == ref_meta["downsample"] and got.shape == ref.shape
    assert dice(got == 1, ref == 1) > 0.98
    fa = json.loads((tmp_path / "o1" / cmu_slide.stem / "annotations.geojson").read_text())["features"]
    fb = json.loads((tmp_path / "o2" / "case-dicom" / "annotations.geojson").read_text())["features"]
    biggest = [max(f, key=lambda x: x["properties"]["measurements"]["Area µm^2"]) for f in (fa, fb)]
    boxes = [np.asarray(b["geometry"]["coordinates"][0]) for b in biggest]
    assert np.allclose(boxes[0].min(0), boxes[1].min(0), atol=16) and np.allclose(
        boxes[0].max(0), boxes[1].max(0), atol=16
    )


def test_ome_tiff_lines_up_exactly(cmu_slide: Path, darkness_registry: Path, tmp_path: Path) -> None:
    from zoo.slide import open_slide

    with open_slide(cmu_slide) as s:
        pixels = s.read_region((0, 0), 0, s.dimensions)
    ome = tmp_path / "slides" / "case.ome.tif"
    ome.parent.mkdir()
    tifffile.imwrite(
        ome, pixels, tile=(256, 256), photometric="rgb", compression="zlib",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499,
                  "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"},
    )  # fmt: skip
    from zoo.jobs import expand_slides

    assert expand_slides([str(ome.parent)]) == [ome]
    ref, ref_meta, _ = _run(darkness_registry, cmu_slide, tmp_path / "o1")
    got, meta, run = _run(darkness_registry, ome, tmp_path / "o2")
    assert run["slide"]["mpp"] == pytest.approx(0.499) and (tmp_path / "o2" / "case").is_dir()
    assert meta["downsample"] == ref_meta["downsample"] and np.array_equal(got, ref)

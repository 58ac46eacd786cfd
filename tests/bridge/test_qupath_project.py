"""QuPath projects via paquo: run only where QuPath is installed; the project file format is checked everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.qupath_project import create_project, qupath_unavailable_reason, read_project_annotations
from tests.conftest import shared
from zoo.errors import QuPathUnavailableError

REASON = qupath_unavailable_reason()


def test_real_qupath_032_project_structure() -> None:
    """The fields our paquo path relies on exist in a real QuPath 0.3.2 project."""
    proj = json.loads(shared("qupath", "project_v0.3.2", "project.qpproj").read_text())
    assert proj["version"] == "0.3.2"
    img = proj["images"][0]
    assert img["serverBuilder"]["providerClassName"].endswith("OpenslideServerBuilder")
    meta = img["serverBuilder"]["metadata"]
    assert meta["levels"][0]["downsample"] == 1.0 and meta["width"] > 0


@pytest.mark.skipif(REASON is None, reason="QuPath is installed here; the unavailable path is not reachable")
def test_clear_error_without_qupath(tmp_path: Path) -> None:
    with pytest.raises(QuPathUnavailableError) as exc:
        create_project(tmp_path / "p", [])
    assert isinstance(exc.value, ImportError) and ("pip install" in str(exc.value) or "QuPath" in str(exc.value))


@pytest.mark.skipif(REASON is not None, reason=f"QuPath/paquo not available: {REASON}")
def test_project_round_trip(cmu_slide: Path, tmp_path: Path) -> None:  # pragma: no cover - needs QuPath
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "zoo.cli",
            "run",
            "tissue-multires",
            str(cmu_slide),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        check=True,
    )
    res = tmp_path / "out" / cmu_slide.stem
    create_project(tmp_path / "proj", [res])
    back = read_project_annotations(tmp_path / "proj")
    (report,) = back.values()
    n = len(json.loads((res / "annotations.geojson").read_text())["features"])
    assert len(report.annotations) == n and not report.rejected


def _paquo_source() -> dict[str, set[str]]:
    """Class name -> method/property names defined in the installed paquo's source (read, not imported:
    importing paquo.projects needs QuPath's jars)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("paquo")
    if spec is None or spec.origin is None:
        pytest.skip("paquo is not installed (pip install '.[qupath]')")
    found: dict[str, set[str]] = {}
    for f in Path(spec.origin).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, set()).update(
                    n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                )
    return found


def test_paquo_api_we_use_exists() -> None:
    """The paquo calls bridge/qupath_project.py makes are in the installed paquo (checked against its source)."""
    api = _paquo_source()
    assert {"add_image", "images", "path_classes"} <= api["QuPathProject"]
    assert "hierarchy" in api["QuPathProjectImageEntry"]
    assert {"to_geojson", "load_geojson", "detections", "annotations"} <= api["QuPathPathObjectHierarchy"]
    assert "to_geojson" in api["_PathROIObject"] or "to_geojson" in api.get("QuPathPathDetectionObject", set())


class _FakeObject:
    def __init__(self, feature: dict[str, object]) -> None:
        self.feature = feature

    def to_geojson(self) -> dict[str, object]:
        return self.feature


class _FakeHierarchy:
    """What paquo's hierarchy returns: to_geojson() gives annotation objects only."""

    def __init__(self, features: list[dict[str, object]]) -> None:
        kind = [f["properties"]["objectType"] for f in features]  # type: ignore[index]
        self._annotations = [f for f, k in zip(features, kind) if k == "annotation"]
        self.detections = [_FakeObject(f) for f, k in zip(features, kind) if k == "detection"]

    def to_geojson(self) -> list[dict[str, object]]:
        return list(self._annotations)


def test_detections_are_read_back_from_a_project() -> None:
    """Issue #13: a project built from `--object-type detection` output read back empty through paquo."""
    from bridge.geojson import parse_qupath_geojson
    from bridge.qupath_project import hierarchy_features

    det = json.loads(shared("qupath", "reexports", "qupath-0.7.0_out-det_cmu-1-small-region.geojson").read_text())
    feats = det["features"]
    hierarchy = _FakeHierarchy(feats)
    assert hierarchy.to_geojson() == []  # what reading annotations alone gave
    rep = parse_qupath_geojson(hierarchy_features(hierarchy))
    assert len(rep.annotations) == len(feats) > 0 and {a.object_type for a in rep.annotations} == {"detection"}

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

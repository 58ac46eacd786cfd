"""QuPath projects through paquo (optional extra ``qupath``; needs a QuPath installation).

paquo starts a JVM with QuPath's jars when ``paquo.projects`` is imported, so it is
imported here only inside the functions. Annotations travel as QuPath GeoJSON, the
same structures :mod:`bridge.geojson` writes and reads, so both paths share one format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.geojson import ImportReport, parse_qupath_geojson
from zoo.errors import QuPathUnavailableError, ZooError


def _paquo() -> Any:
    """The paquo modules, or a clear error saying what to install."""
    try:
        from paquo.classes import QuPathPathClass
        from paquo.images import QuPathImageType
        from paquo.projects import QuPathProject
    except ImportError as err:
        raise QuPathUnavailableError(
            f"paquo is not installed ({err}); pip install '.[qupath]' and install QuPath (https://qupath.github.io)"
        ) from err
    except Exception as err:  # paquo raises its own error when it cannot find QuPath's jars
        raise QuPathUnavailableError(
            f"paquo cannot start QuPath ({err}); install QuPath and set PAQUO_QUPATH_DIR to its folder"
        ) from err
    return QuPathProject, QuPathPathClass, QuPathImageType


def qupath_unavailable_reason() -> str | None:
    """None when paquo and QuPath can be used here, else why not (for test skips)."""
    try:
        _paquo()
    except QuPathUnavailableError as err:
        return str(err)
    return None


def create_project(project_dir: Path, results_dirs: list[Path]) -> Path:
    """A new QuPath project with each result's slide and its predicted annotations.

    Args:
        project_dir: folder to create (must not exist, as QuPath expects).
        results_dirs: folders written by ``zoo run`` (``run.json`` + ``annotations.geojson``).
    """
    QuPathProject, QuPathPathClass, QuPathImageType = _paquo()
    if project_dir.exists():
        raise ZooError(f"{project_dir}: already exists; choose a new project folder")
    with QuPathProject(project_dir, mode="x") as qp:
        classes: dict[str, Any] = {}
        for res in results_dirs:
            run = json.loads((res / "run.json").read_text())
            features = json.loads((res / "annotations.geojson").read_text())["features"]
            for f in features:
                c = f["properties"]["classification"]
                if c["name"] not in classes:
                    classes[c["name"]] = QuPathPathClass(c["name"], color="#{:02x}{:02x}{:02x}".format(*c["color"]))
            qp.path_classes = list(classes.values())
            entry = qp.add_image(run["slide"]["path"], image_type=QuPathImageType.BRIGHTFIELD_H_E)
            entry.hierarchy.load_geojson(features)
    return project_dir / "project.qpproj"


def hierarchy_features(hierarchy: Any) -> list[dict[str, Any]]:
    """Every annotation *and detection* of a paquo hierarchy as GeoJSON features.

    paquo's ``hierarchy.to_geojson()`` serialises annotation objects only, so a project built
    from ``--object-type detection`` output would read back empty; detections are added from
    ``hierarchy.detections`` (each object's ``to_geojson()``).
    """
    features = list(hierarchy.to_geojson())
    features.extend(d.to_geojson() for d in hierarchy.detections)
    return features


def read_project_annotations(project_dir: Path) -> dict[str, ImportReport]:
    """Annotations and detections of every image of a (pathologist-edited) project, per image name."""
    QuPathProject, _, _ = _paquo()
    out: dict[str, ImportReport] = {}
    with QuPathProject(project_dir, mode="r") as qp:
        for image in qp.images:
            out[image.image_name] = parse_qupath_geojson(
                hierarchy_features(image.hierarchy), f"{project_dir}:{image.image_name}"
            )
    return out

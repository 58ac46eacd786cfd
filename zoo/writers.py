"""The files of a result folder, each written by one small function registered by name in :data:`WRITERS`.

A writer takes the slide job's :class:`zoo.slide_job.Predicted`, the partial folder it writes into and the
``outputs`` table (name -> file) that run.json lists, and adds its file(s) there. The order matters where
one output uses another: the GeoJSON counts objects per class for ``classes.csv`` and the overview
legend, and run.json, last, lists everything. Adding an output is a writer and one line in the table.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo import __version__
from zoo.results import RESULT_FILES, probability_file

if TYPE_CHECKING:
    from zoo.slide_job import Predicted

#: (what was predicted, the partial folder, outputs name -> file) -> None
Writer = Callable[["Predicted", Path, dict[str, str]], None]


def write_mask(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``mask.tiff`` (``--formats tiff``): the pyramidal label mask with its palette (grey for unknown tiles)."""
    from zoo.labelmask import UNKNOWN_LABEL
    from zoo.outputs import write_mask_tiff

    if "tiff" not in done.job.cfg.formats:
        return
    entry = done.job.entry
    cmap = {c.index: tuple(c.color) for c in entry.classes}
    if done.pred.stats.get("bad_tiles"):
        cmap[UNKNOWN_LABEL] = (128, 128, 128)
    write_mask_tiff(
        work / RESULT_FILES["tiff"],
        done.pred.mask,
        done.mask_mpp,
        colormap=cmap,  # type: ignore[arg-type]
        description=json.dumps(done.mask_metadata()),
    )
    outputs["mask"] = RESULT_FILES["tiff"]


def write_probabilities(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``probability_<class>.tiff`` per foreground class (``--formats probability``): probability x 255."""
    from zoo.outputs import write_mask_tiff

    if "probability" not in done.job.cfg.formats:
        return
    meta = done.mask_metadata()
    for c in done.job.entry.foreground:
        name = probability_file(c.name)
        write_mask_tiff(
            work / name,
            done.pred.probabilities[c.index],
            done.mask_mpp,
            description=json.dumps({**meta, "class": c.name, "values": "probability x 255"}),
        )
        outputs[f"probability_{c.name}"] = name


def write_geojson(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``annotations.geojson`` (``--formats geojson``): QuPath objects, one per region; counts them per class."""
    from bridge.geojson import ClassStyle, mask_to_feature_collection
    from zoo.outputs import write_json

    if "geojson" not in done.job.cfg.formats:
        return
    cfg, entry = done.job.cfg, done.job.entry
    # QuPath classification per class (``qupath_name``, e.g. "Ignore*" for regions to leave out)
    classes = [ClassStyle(c.index, c.qupath_name or c.name, tuple(c.color), c.qupath_name) for c in entry.classes]  # type: ignore[arg-type]
    fc = mask_to_feature_collection(
        done.pred.mask,
        [c for c in classes if c.index != 0],
        downsample=done.pred.downsample,
        mpp0=done.mpp0,
        simplify_um=cfg.simplify_um,
        min_area_um2=cfg.min_area_um2,
        object_type=cfg.object_type,  # type: ignore[arg-type]
        probabilities=done.pred.probabilities,
    )
    write_json(work / RESULT_FILES["geojson"], fc)
    outputs["geojson"] = RESULT_FILES["geojson"]
    outputs["geojson_features"] = str(len(fc["features"]))
    for c in entry.classes:
        done.areas[c.name]["objects"] = sum(
            f["properties"]["classification"]["name"] == (c.qupath_name or c.name) for f in fc["features"]
        )


def write_classes(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``classes.csv``: area, fraction, objects and mean probability per class."""
    write_class_table(work / RESULT_FILES["table"], done.areas)
    outputs["table"] = RESULT_FILES["table"]


def write_class_table(dest: Path, areas: dict[str, dict[str, Any]]) -> None:
    """``classes.csv``: one row per class: area, fraction, objects in the GeoJSON, mean probability."""
    from zoo.outputs import atomic_path

    cols = ["class", "area_mm2", "fraction", "objects", "mean_probability"]
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, a in areas.items():
            w.writerow([name, *("" if a.get(k) is None else a.get(k) for k in cols[1:])])


def write_overview(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``overview.png``: the thumbnail with each class filled and outlined, legend, scale bar and caption."""
    from zoo.pictures import render_overview, sample_mask

    entry, slide_path, mpp0 = done.job.entry, done.job.slide_path, done.mpp0
    caption = f"{entry.id} · mask at {done.mask_mpp:.2f} µm/px" if done.mask_mpp else f"{entry.id}"
    caption += f" · {slide_path.name}"
    if done.resolution["slide_mpp_assumed"]:
        caption += f" · slide resolution ASSUMED {mpp0:g} µm/px ({done.resolution['slide_mpp_source']})"
    render_overview(
        work / RESULT_FILES["picture"],
        done.thumb,
        sample_mask(done.pred.mask, done.thumb.shape[:2], done.thumb_ds / done.pred.downsample),
        entry.classes,
        None if mpp0 is None else mpp0 * done.thumb_ds,
        caption,
        done.areas,
    )
    outputs["picture"] = RESULT_FILES["picture"]


def write_run_json(done: Predicted, work: Path, outputs: dict[str, str]) -> None:
    """``run.json`` (last): provenance of the result: versions, model files and sha256, engine and why, the
    request used for resuming, the slide, the resolution, class areas, statistics, timings, warnings."""
    from zoo.outputs import write_json
    from zoo.slide_job import request_of, versions

    job, entry = done.job, done.job.entry
    files = job.files
    engine = job.engine
    run_info: dict[str, Any] = {
        "zoo_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "arguments": asdict(job.cfg),
        "request": request_of(job.cfg, entry),
        "source": done.identity,
        "rerun_reason": job.rerun_reason,
        "versions": versions(),
        "model": {
            "id": entry.id,
            "kind": entry.kind,
            "sha256": entry.weights.sha256,
            "files": [{"path": str(p), "sha256": s} for p, s in zip(files, job.files_sha256)],
            "stages": {n: {"engine": e.engine, "precision": e.precision} for n, e in job.stage_engines.items()},
            "weights": str(files[0]),
            "licence": entry.licence,
        },
        "providers": done.providers,
        "engine": {
            "engine": engine.engine,
            "precision": engine.precision,
            "why": engine.reason,
            "considered": engine.considered,
        },
        "slide": done.slide_info,
        "resolution": done.resolution,
        "classes": done.areas,
        "stats": done.pred.stats,
        "seconds": round(time.perf_counter() - done.started, 3),
        "outputs": outputs,
        "warnings": done.warnings,
    }
    write_json(work / "run.json", run_info)
    done.run_info.update(run_info)


#: every output of a result folder, in the order they are written (run.json last: it lists the others)
WRITERS: list[tuple[str, Writer]] = [
    ("mask", write_mask),
    ("probability", write_probabilities),
    ("geojson", write_geojson),
    ("classes", write_classes),
    ("overview", write_overview),
    ("run.json", write_run_json),
]

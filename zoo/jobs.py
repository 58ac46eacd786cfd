"""One slide in, a folder of results out; many slides, locally or on Dask.

A slide's results go to ``<out>/<slide stem>/``: ``mask.tiff`` (pyramidal label
mask), ``annotations.geojson`` (QuPath) and ``run.json`` (provenance). They are
built in a hidden temporary folder and renamed into place only when complete, so a
failure never leaves partial output.
"""

from __future__ import annotations

import glob
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zoo import __version__
from zoo.errors import OutputError, ZooError
from zoo.registry import ModelEntry, Registry, load_registry, verified_weights
from zoo.runner import RunOptions
from zoo.slide import open_slide

FORMATS = ("tiff", "geojson")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".btf")


@dataclass
class JobConfig:
    """Everything that defines one run, except the slide (picklable for Dask workers)."""

    model: str | None = None
    registry_path: str | None = None
    out_dir: str = "out"
    formats: tuple[str, ...] = FORMATS
    backend: str = "auto"
    run: RunOptions = field(default_factory=RunOptions)
    simplify_um: float = 2.0
    min_area_um2: float = 500.0
    object_type: str = "annotation"
    force: bool = False


@dataclass
class JobResult:
    slide: str
    status: str  # "ok", "skipped", "failed"
    out: str | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def expand_slides(inputs: Sequence[str]) -> list[Path]:
    """Slides named directly, by glob, or found (non-recursively) in folders, in order, without duplicates."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found.extend(sorted(c for c in p.iterdir() if c.suffix.lower() in SLIDE_SUFFIXES))
        elif any(ch in item for ch in "*?["):
            found.extend(Path(m) for m in sorted(glob.glob(item)))
        else:
            found.append(p)
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    out = {"zoo": __version__, "python": platform.python_version()}
    for mod in ("numpy", "onnxruntime", "openslide", "tifffile", "rasterio", "shapely"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except ImportError:
            out[mod] = "absent"
    try:
        import openslide

        out["libopenslide"] = str(openslide.__library_version__)
    except (ImportError, AttributeError):
        pass
    return out


def _result_dir(cfg: JobConfig, slide: Path) -> Path:
    return Path(cfg.out_dir) / slide.stem


def _done(cfg: JobConfig, slide: Path, entry: ModelEntry) -> bool:
    rj = _result_dir(cfg, slide) / "run.json"
    try:
        return json.loads(rj.read_text()).get("model", {}).get("id") == entry.id
    except (OSError, json.JSONDecodeError):
        return False


def run_slide(slide_path: str | Path, cfg: JobConfig, registry: Registry | None = None) -> JobResult:
    """Run ``cfg.model`` on one slide and write its results folder.

    Raises:
        ZooError: on bad input (missing/corrupt slide, unknown model, checksum, output).
    """
    from bridge.geojson import ClassStyle, mask_to_feature_collection
    from zoo.outputs import current_umask, write_json, write_mask_tiff
    from zoo.runner import OnnxModel, predict_slide

    slide_path = Path(slide_path)
    reg = registry or load_registry(cfg.registry_path)
    entry = reg.get(cfg.model)
    dest = _result_dir(cfg, slide_path)
    if not cfg.force and _done(cfg, slide_path, entry):
        return JobResult(str(slide_path), "skipped", str(dest), summary={"reason": f"already done with {entry.id}"})
    weights = verified_weights(entry, reg)
    t0 = time.perf_counter()
    with open_slide(slide_path, backend=cfg.backend) as slide:  # type: ignore[arg-type]
        model = OnnxModel(weights, entry, cfg.run.providers, cfg.run.threads)
        pred = predict_slide(slide, model, cfg.run)
        slide_info = slide.describe()
        mpp0 = cfg.run.slide_mpp or slide.mpp
        mpp0_assumed = pred.choice.mpp_assumed if pred.choice else mpp0 is None
        if mpp0 is None and pred.choice is not None:
            mpp0 = pred.choice.mpp / pred.choice.downsample
    classes = [ClassStyle(c.index, c.name, tuple(c.color)) for c in entry.classes]  # type: ignore[arg-type]
    fractions = pred.class_fractions()
    mask_mpp = None if mpp0 is None else mpp0 * pred.downsample
    areas = {
        c.name: {
            "fraction": round(float(fractions.get(c.index, 0.0)), 5),
            "area_mm2": None
            if mask_mpp is None
            else round(float(fractions.get(c.index, 0.0)) * pred.mask.size * mask_mpp**2 / 1e6, 4),
        }
        for c in entry.classes
    }
    tmp_parent = dest.parent
    try:
        tmp_parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=tmp_parent))
    except OSError as err:
        raise OutputError(
            f"{tmp_parent}: cannot write results here ({err.strerror}); choose a writable --out folder"
        ) from err
    try:
        outputs: dict[str, str] = {}
        meta = {
            "model": entry.id,
            "downsample": pred.downsample,
            "mpp": mask_mpp,
            "classes": [{"index": c.index, "name": c.name, "color": list(c.color)} for c in entry.classes],
            "slide": str(slide_path),
        }
        if "tiff" in cfg.formats:
            write_mask_tiff(
                work / "mask.tiff",
                pred.mask,
                mask_mpp,
                colormap={c.index: tuple(c.color) for c in entry.classes},  # type: ignore[misc]
                description=json.dumps(meta),
            )
            outputs["mask"] = "mask.tiff"
        if "geojson" in cfg.formats:
            fc = mask_to_feature_collection(
                pred.mask,
                [c for c in classes if c.index != 0],
                downsample=pred.downsample,
                mpp0=mpp0,
                simplify_um=cfg.simplify_um,
                min_area_um2=cfg.min_area_um2,
                object_type=cfg.object_type,  # type: ignore[arg-type]
            )
            write_json(work / "annotations.geojson", fc)
            outputs["geojson"] = "annotations.geojson"
            outputs["geojson_features"] = str(len(fc["features"]))
        run_info = {
            "zoo_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "arguments": asdict(cfg),
            "versions": versions(),
            "model": {
                "id": entry.id,
                "sha256": entry.weights.sha256,
                "weights": str(weights),
                "licence": entry.licence,
            },
            "providers": model.providers,
            "slide": slide_info,
            "resolution": {
                "level": pred.choice.level if pred.choice else None,
                "extra_downsample": pred.choice.factor if pred.choice else None,
                "mask_downsample": pred.downsample,
                "mask_mpp": mask_mpp,
                "slide_mpp_assumed": mpp0_assumed,
            },
            "classes": areas,
            "stats": pred.stats,
            "seconds": round(time.perf_counter() - t0, 3),
            "outputs": outputs,
        }
        write_json(work / "run.json", run_info)
        work.chmod(0o777 & ~current_umask())
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    summary = {"model": entry.id, "classes": areas, "seconds": run_info["seconds"], "level": run_info["resolution"]}
    return JobResult(str(slide_path), "ok", str(dest), summary=summary)


def run_slide_safe(slide_path: str | Path, cfg: JobConfig) -> JobResult:
    """:func:`run_slide` that reports failures as a result instead of raising (for batches)."""
    try:
        return run_slide(slide_path, cfg)
    except ZooError as err:
        return JobResult(str(slide_path), "failed", error=str(err))
    except Exception as err:  # an unexpected bug on one slide must not stop the batch
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        return JobResult(str(slide_path), "failed", error=f"{slide_path}: unexpected error: {tb}")


def run_many(slides: Iterable[Path], cfg: JobConfig) -> list[JobResult]:
    """Run slides one after another in this process; failures are collected, not raised."""
    return [run_slide_safe(s, cfg) for s in slides]


def run_many_dask(
    slides: Sequence[Path], cfg: JobConfig, scheduler: str | None = None, workers: int = 2, threads_per_worker: int = 1
) -> list[JobResult]:
    """Run slides on a Dask cluster: ``scheduler`` address, or a local cluster of ``workers`` processes.

    Each task runs one slide; the ONNX session uses ``cfg.run.threads`` threads per worker.
    """
    from dask.distributed import Client, LocalCluster

    cfg = replace(cfg, run=replace(cfg.run, progress=False))
    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        futures = client.map(run_slide_safe, [str(s) for s in slides], cfg=cfg, pure=False)
        return list(client.gather(futures))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

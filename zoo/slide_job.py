"""One slide in, one result folder out: the slide job as named steps that read top to bottom.

:func:`run_slide` takes the folder's lock, decides whether an earlier result can be reused, and otherwise
runs the steps:

1. :func:`resolve`: the registry entry, its pinned files and each network's engine and precision;
2. :func:`predict`: the slide opened, the networks loaded (the pre-mask computed meanwhile) and the
   entry's model kind run (:func:`zoo.kinds.predict`), then the resolution and class areas worked out;
3. :func:`write`: every output written into a hidden partial folder by its writer
   (:data:`zoo.writers.WRITERS`, one small function per file, registered by name);
4. :func:`zoo.results.publish`: the finished folder moved into place.

A result is reused (``skipped``) only when its ``run.json`` records the same request (model and its sha256,
resolution options, formats, vectorisation options), the same slide (path, size, modification time) and
every expected output still exists.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo import __version__
from zoo.errors import OutputError, raise_if_signalled
from zoo.procstats import peak_rss_mb
from zoo.registry import ModelEntry, Registry, load_registry, verified_model_files
from zoo.results import (
    RESULT_FILES,
    holds_other_model,
    make_partial,
    probability_file,
    publish,
    remove_stale_partials,
    result_dirs,
    result_lock,
    slide_identity,
    writable_for,
)
from zoo.runner import RunOptions
from zoo.slide import open_slide

if TYPE_CHECKING:
    import numpy as np

    from zoo.engines.select import EngineChoice
    from zoo.runner import Prediction

FORMATS = ("tiff", "geojson", "probability")


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
    on_bad_tile: str = "fail"
    engine: str = "auto"
    precision: str = "auto"


@dataclass
class JobResult:
    """What became of one slide: ``ok``, ``skipped`` (and why) or ``failed`` (and the one-line error)."""

    slide: str
    status: str  # "ok", "skipped", "failed"
    out: str | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    out = {"zoo": __version__, "python": platform.python_version()}
    for mod in ("numpy", "onnxruntime", "openslide", "tifffile", "simplejpeg", "rasterio", "shapely"):
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


def converted_sha256(entry: ModelEntry) -> dict[str, str]:
    """``{stage/precision: sha256}`` of the converted copies (int8) an entry registers: a result made before
    one was registered, when ``auto`` could not pick it, is not reused."""
    return {
        f"{name}/{p}": spec.weights.sha256
        for name, view in entry.networks()
        for p, spec in view.precisions.items()
        if spec.weights is not None
    }


def request_of(cfg: JobConfig, entry: ModelEntry) -> dict[str, Any]:
    """The options that change a result (not speed options such as threads or batch size)."""
    r = cfg.run
    return {
        "model": entry.id,
        "sha256": entry.weights.sha256 if not entry.stages else entry.pinned_sha256(),
        **({"converted_sha256": converted} if (converted := converted_sha256(entry)) else {}),
        "target_mpp": r.target_mpp,
        "level": r.level,
        "slide_mpp": r.slide_mpp,
        "force_slide_mpp": r.force_slide_mpp,
        "skip_background": r.skip_background,
        "formats": sorted(cfg.formats),
        "simplify_um": cfg.simplify_um,
        "min_area_um2": cfg.min_area_um2,
        "object_type": cfg.object_type,
        "on_bad_tile": cfg.on_bad_tile,
        "engine": cfg.engine,
        "precision": cfg.precision,
    }


def reuse_reason(dest: Path, slide: Path, cfg: JobConfig, entry: ModelEntry) -> tuple[bool, str]:
    """(True, why) when ``dest`` holds results of exactly this request on this slide; else (False, why not)."""
    try:
        info = json.loads((dest / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, "no previous result"
    if not isinstance(info, dict):
        return False, "previous run.json is not readable"
    old_req, new_req = info.get("request") or {}, request_of(cfg, entry)
    changed = sorted(k for k in new_req if old_req.get(k) != new_req[k])
    if changed:
        return False, "options changed: " + ", ".join(f"{k} {old_req.get(k)!r} -> {new_req[k]!r}" for k in changed)
    old_src, new_src = info.get("source") or {}, slide_identity(slide)
    if old_src != new_src:
        return False, "the slide file changed (size or modification time)"
    missing = [n for n in expected_outputs(cfg, entry) if not (dest / n).is_file()]
    if missing:
        return False, f"{', '.join(missing)} missing"
    return True, f"already done with {entry.id} and the same options"


def expected_outputs(cfg: JobConfig, entry: ModelEntry) -> list[str]:
    """Files a finished result folder holds for ``cfg`` (run.json aside)."""
    names = [RESULT_FILES["table"], RESULT_FILES["picture"]]
    if "tiff" in cfg.formats:
        names.append(RESULT_FILES["tiff"])
    if "geojson" in cfg.formats:
        names.append(RESULT_FILES["geojson"])
    if "probability" in cfg.formats:
        names += [probability_file(c.name) for c in entry.foreground]
    return names


# --------------------------------------------------------------------------- one slide


def run_slide(
    slide_path: str | Path,
    cfg: JobConfig,
    registry: Registry | None = None,
    dest: Path | None = None,
    on_message: Callable[[str], None] | None = None,
) -> JobResult:
    """Run ``cfg.model`` on one slide and write its results folder.

    Args:
        dest: result folder (default: from :func:`result_dirs` for this slide alone).
        on_message: called with one-line notices (waiting for a lock, stale partials removed).

    Raises:
        ZooError: on bad input (missing/corrupt slide, unknown model, checksum, output).
    """
    slide_path = Path(slide_path)
    reg = registry or load_registry(cfg.registry_path)
    entry = reg.get(cfg.model)
    dest = dest or result_dirs([slide_path], cfg.out_dir, entry.name)[slide_path]
    if not slide_path.exists():
        from zoo.errors import SlideOpenError

        raise SlideOpenError(f"{slide_path}: no such file; check the path")
    with result_lock(dest, on_message):
        removed = remove_stale_partials(dest)
        if removed and on_message:
            on_message(f"{dest}: removed {removed} partial result folder(s) left by an interrupted run")
        moved = not writable_for(dest, slide_path, entry.name) and holds_other_model(dest, slide_path, entry.name)
    if moved:  # another model's results of this slide arrived first (a concurrent run): a folder of our own
        alt = result_dirs([slide_path], dest.parent, entry.name)[slide_path]
        if alt != dest:
            if on_message:
                on_message(f"{dest}: holds another model's results of this slide; writing {entry.name}'s to {alt}")
            return run_slide(slide_path, cfg, reg, alt, on_message)
    with result_lock(dest, on_message):
        if not writable_for(dest, slide_path, entry.name):
            raise OutputError(
                f"{dest}: exists and does not hold this slide's results (another slide's, or not written by zoo); "
                "move it away or choose another --out"
            )
        reuse, why = reuse_reason(dest, slide_path, cfg, entry)
        if reuse and not cfg.force:
            return JobResult(str(slide_path), "skipped", str(dest), summary={"reason": why})
        return run_steps(slide_path, cfg, reg, entry, dest, rerun_reason=None if cfg.force else why)


def run_steps(
    slide_path: Path, cfg: JobConfig, reg: Registry, entry: ModelEntry, dest: Path, rerun_reason: str | None
) -> JobResult:
    """Resolve, predict, write into a partial folder, publish (call with ``dest``'s lock held)."""
    from zoo.outputs import current_umask

    job = resolve(slide_path, cfg, reg, entry, dest, rerun_reason)
    done = predict(job)
    work = make_partial(dest)
    try:
        write(done, work)
        raise_if_signalled()  # a stop request a library swallowed: still nothing published
        publish(work, dest, current_umask())
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        done.pred.close()
    return JobResult(str(slide_path), "ok", str(dest), summary=summary_of(done))


@dataclass
class Resolved:
    """Step 1, what runs: the entry, its pinned files (stage by stage) and each network's engine and precision."""

    slide_path: Path
    cfg: JobConfig
    registry: Registry
    entry: ModelEntry
    dest: Path
    rerun_reason: str | None
    stage_files: dict[str, list[Path]]
    engine: EngineChoice
    stage_engines: dict[str, EngineChoice]

    @property
    def files(self) -> list[Path]:
        """Every pinned file that runs, stage by stage."""
        return [p for name, _ in self.entry.networks() for p in self.stage_files[name]]

    @property
    def files_sha256(self) -> list[str]:
        """The pinned sha256 of each of :attr:`files`."""
        out = []
        for name, view in self.entry.networks():
            w = view.weights_for(self.stage_engines[name].precision)
            out += [w.sha256, *(f.sha256 for f in w.files)]
        return out


def resolve(
    slide_path: Path, cfg: JobConfig, reg: Registry, entry: ModelEntry, dest: Path, rerun_reason: str | None
) -> Resolved:
    """Verify every pinned file and choose each network's engine and precision (the first stage's as asked)."""
    from zoo.engines.select import gpu_engines
    from zoo.verify import select_engine

    networks = entry.networks()

    def choose(view: ModelEntry, precision: str) -> EngineChoice:
        gpu = gpu_engines(view, cfg.engine, cfg.run.providers, cfg.run.device)
        return select_engine(view, reg, cfg.engine, precision, gpu=gpu)

    engine = choose(entry, cfg.precision)
    stage_engines = {name: engine if view is entry else choose(view, "auto") for name, view in networks}
    # the files each network runs: its precision's own copy (int8) or the fp32 file
    stage_files = {name: verified_model_files(view, reg, stage_engines[name].precision) for name, view in networks}
    return Resolved(slide_path, cfg, reg, entry, dest, rerun_reason, stage_files, engine, stage_engines)


@dataclass
class Predicted:
    """Step 2, what the outputs are made of: the kind's prediction, the slide, its resolution and class areas."""

    job: Resolved
    pred: Prediction
    providers: list[str]
    identity: dict[str, Any]
    slide_info: dict[str, Any]
    thumb: np.ndarray
    thumb_ds: float
    resolution: dict[str, Any]
    areas: dict[str, dict[str, Any]]
    warnings: list[str]
    started: float
    #: what :func:`zoo.writers.write_run_json` wrote
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def mask_mpp(self) -> float | None:
        return self.resolution["mask_mpp"]

    @property
    def mpp0(self) -> float | None:
        return self.resolution["slide_mpp"]

    def mask_metadata(self) -> dict[str, Any]:
        """The JSON that every TIFF's description holds: model, downsample, µm/px, classes, slide."""
        entry = self.job.entry
        return {
            "model": entry.id,
            "downsample": self.pred.downsample,
            "mpp": self.mask_mpp,
            "classes": [
                {"index": c.index, "name": c.name, "color": list(c.color)}
                | ({"qupath_name": c.qupath_name} if c.qupath_name else {})
                for c in entry.classes
            ],
            "slide": str(self.job.slide_path),
        }


def predict(job: Resolved) -> Predicted:
    """Open the slide, load the networks (the thumbnail pre-mask is computed meanwhile, ~0.3 s each), run the
    entry's model kind, and work out the resolution and the area of each class."""
    from zoo.engines.model import OnnxModel
    from zoo.kinds import predict as predict_kind
    from zoo.runner import auto_batch_size, background_premask
    from zoo.slide import thumbnail

    cfg, entry = job.cfg, job.entry
    identity = slide_identity(job.slide_path)
    t0 = time.perf_counter()
    with (
        open_slide(job.slide_path, backend=cfg.backend, on_bad_tile=cfg.on_bad_tile) as slide,  # type: ignore[arg-type]
        ThreadPoolExecutor(1, thread_name_prefix="premask") as side,
    ):
        uses_premask = entry.input.mode != "whole-slide" and entry.selection.tissue_premask and cfg.run.skip_background
        premask = side.submit(background_premask, slide) if uses_premask and cfg.run.premask is None else None
        models = {
            name: OnnxModel(
                job.stage_files[name][0], view, cfg.run.providers, cfg.run.threads, cfg.run.device,
                job.stage_engines[name].engine, job.stage_engines[name].precision,
                cfg.run.batch_size or auto_batch_size(view),
            )
            for name, view in entry.networks()
        }  # fmt: skip
        run_opts = replace(cfg.run, premask=premask.result()) if premask is not None else cfg.run
        pred = predict_kind(slide, entry, models, run_opts)
        slide_info = slide.describe()
        thumb, thumb_ds = thumbnail(slide, max_side_px=1024)
    resolution = resolution_of(pred, slide_info, cfg)
    areas = class_areas(entry, pred, resolution["mask_mpp"])
    return Predicted(
        job, pred, models[entry.stage_name].providers, identity, slide_info, thumb, thumb_ds, resolution, areas,
        resolution_warnings(entry, cfg, pred.choice), t0,
    )  # fmt: skip


def resolution_of(pred: Prediction, slide_info: dict[str, Any], cfg: JobConfig) -> dict[str, Any]:
    """Level, downsampling and µm/px of the mask, and the slide's µm/px with where it came from."""
    choice = pred.choice
    mpp0 = choice.mpp0 if choice else (slide_info["mpp"] or cfg.run.slide_mpp)
    source = choice.mpp_source if choice else ("file" if slide_info["mpp"] else "--slide-mpp")
    return {
        "level": choice.level if choice else None,
        "extra_downsample": choice.factor if choice else None,
        "mask_downsample": pred.downsample,
        "mask_mpp": None if mpp0 is None else mpp0 * pred.downsample,
        "slide_mpp": mpp0,
        "slide_mpp_source": source,
        "slide_mpp_assumed": source in ("assumed default", "objective power"),
    }


def class_areas(entry: ModelEntry, pred: Prediction, mask_mpp: float | None) -> dict[str, dict[str, Any]]:
    """Per class: fraction of the mask, area in mm² (when the µm/px is known) and mean probability; and the
    unknown (undecodable tiles) area when ``--on-bad-tile skip`` masked any."""
    from zoo.labelmask import UNKNOWN_LABEL

    fractions = pred.class_fractions()
    mean_prob = pred.mean_class_probability()

    def mm2(f: float) -> float | None:
        return None if mask_mpp is None else round(f * pred.mask.size * mask_mpp**2 / 1e6, 4)

    areas: dict[str, dict[str, Any]] = {
        c.name: {
            "fraction": round(float(fractions.get(c.index, 0.0)), 5),
            "area_mm2": mm2(float(fractions.get(c.index, 0.0))),
            "mean_probability": None if c.index not in mean_prob else round(mean_prob[c.index], 4),
        }
        for c in entry.classes
    }
    if fractions.get(UNKNOWN_LABEL):
        f = float(fractions[UNKNOWN_LABEL])
        areas["Unknown (undecodable tiles)"] = {"fraction": round(f, 5), "area_mm2": mm2(f)}
    return areas


def write(done: Predicted, work: Path) -> dict[str, str]:
    """Step 3: every writer of :data:`zoo.writers.WRITERS`, in order, into ``work``; returns the outputs
    (name -> file) that run.json lists."""
    from zoo.writers import WRITERS

    outputs: dict[str, str] = {}
    for _name, writer in WRITERS:
        writer(done, work, outputs)
    return outputs


def summary_of(done: Predicted) -> dict[str, Any]:
    """The result's summary (the batch table, ``--json``), with the found-none hint for tissue models."""
    entry, pred, info = done.job.entry, done.pred, done.run_info
    warnings = list(done.warnings)
    pre = pred.stats.get("premask_tissue_fraction")
    fractions = pred.class_fractions()
    found_none = not any(fractions.get(c.index, 0.0) for c in entry.foreground)
    if entry.task == "tissue-segmentation" and pre and pre > 0 and found_none:  # for tumour models "none" is an answer
        run_mpp = pred.choice.mpp if pred.choice else pred.mpp
        warnings.append(
            f"the pre-mask sees tissue ({pre:.1%} of the slide) but the model found none at {run_mpp:g} µm/px: "
            "small tissue may vanish at a coarse resolution; try a finer --mpp (e.g. --mpp 2 or 1)"
        )
    engine = done.job.engine
    return {
        "model": entry.id,
        "classes": done.areas,
        "seconds": info["seconds"],
        "level": done.resolution,
        "slide_mpp_source": done.resolution["slide_mpp_source"],
        "bad_tiles": len(pred.stats.get("bad_tiles", [])),
        "rerun_reason": done.job.rerun_reason,
        "engine": f"{engine.engine} {engine.precision}",
        "tiles_run": pred.stats.get("tiles_run"),
        "tiles_total": pred.stats.get("tiles_total"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "warnings": warnings,
    }


#: how far (factor) from the nearest trained resolution a run may be before it is warned about
TRAINED_MPP_SLACK = 2.0


def resolution_warnings(entry: ModelEntry, cfg: JobConfig, choice: Any) -> list[str]:
    """Warnings (also in run.json) for a resolution the slide cannot give, or far from what the model was trained at."""
    out: list[str] = []
    if choice is None:
        return out
    asked = cfg.run.target_mpp if cfg.run.level is None else None
    if asked and choice.mpp > asked * 1.25:
        out.append(
            f"--mpp {asked:g} is finer than this slide's finest level ({choice.mpp0:g} µm/px): ran at "
            f"{choice.mpp:g} µm/px, not upsampled; pass --mpp {choice.mpp0:g} or coarser to silence this"
        )
    trained = entry.input.trained_mpp
    if trained and entry.input.mode == "tiled":
        nearest = min(trained, key=lambda m: abs(math.log(choice.mpp / m)))
        if not nearest / TRAINED_MPP_SLACK <= choice.mpp <= nearest * TRAINED_MPP_SLACK:
            out.append(
                f"{entry.id} ran at {choice.mpp:.3g} µm/px, far from what it was trained at "
                f"({', '.join(f'{m:g}' for m in trained)} µm/px): expect unreliable results; "
                f"use --mpp {nearest:g}"
            )
    return out

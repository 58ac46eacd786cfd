"""One slide in, a folder of results out; many slides, locally or on Dask.

Safety rules, each tested in ``tests/zoo/test_jobs.py``:

* A slide's results go to ``<out>/<name>/`` where ``name`` is the slide's file stem
  made safe (letters, digits, ``._-``; no leading dot; at most 80 characters; never
  ``.``/``..``), so no path derived from a slide name can leave ``--out``. Slides whose
  safe names collide within a batch (``a/s.svs`` and ``b/s.svs``, ``case1.svs`` and
  ``case1.tif``, names differing only in case), or whose folder already holds another
  slide's results, get ``<name>-<8 hex digits of the slide's resolved path>``.
* Each (slide, model) keeps its own complete result: a folder that holds another model's
  results of the same slide is never written into; the second model's go to
  ``<name>-<model name>/`` (decided again under the lock, so concurrent runs of two models
  on one slide also end in two folders). ``summary.csv`` keeps the rows of earlier runs
  into the same ``--out`` whose folders still exist.
* Results are built in a hidden ``.<name>.XXXXXXXX.partial`` folder (marked as zoo's own)
  and moved into place when complete. A folder that exists already is only written into
  when its ``run.json`` says it holds this slide's results; then only the files this run
  writes are replaced, ``run.json`` last. Nothing else is ever deleted or overwritten.
* One lock per result folder (``<out>/.<name>.zoo-lock`` while it is held): concurrent runs on
  the same slide wait for each other; the holder removes stale partial folders of that
  name left by a killed run.
* A result is reused (``skipped``) only when its ``run.json`` records the same request
  (model and its sha256, resolution options, formats, vectorisation options), the same
  slide (path, size, modification time) and every expected output still exists.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zoo import __version__
from zoo.errors import OutputError, ZooError, raise_if_signalled
from zoo.procstats import peak_rss_mb
from zoo.registry import ModelEntry, Registry, load_registry, verified_model_files
from zoo.runner import RunOptions
from zoo.slide import open_slide

FORMATS = ("tiff", "geojson", "probability")
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".btf", ".qptiff", ".dcm",
)  # fmt: skip
#: Files a result folder may hold that zoo writes (only these, and ``probability_<class>.tiff``, are replaced).
RESULT_FILES = {
    "tiff": "mask.tiff",
    "geojson": "annotations.geojson",
    "table": "classes.csv",
    "picture": "overview.png",
}
SUMMARY_COLUMNS = [
    "slide",
    "status",
    "message",
    "model",
    "result_folder",
    "level",
    "mask_mpp",
    "slide_mpp",
    "slide_mpp_source",
    "resolution_assumed",
    "classes",
    "tiles_run",
    "tiles_total",
    "seconds",
    "peak_rss_mb",
]
MAX_NAME_CHARS = 80
PARTIAL_MARKER = ".zoo-partial"
LOCK_TEXT = b"zoo result-folder lock\n"


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
    slide: str
    status: str  # "ok", "skipped", "failed"
    out: str | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def expand_slides(inputs: Sequence[str]) -> list[Path]:
    """Slides named directly, by glob, or found in folders, in order, without duplicates.

    A folder holding a DICOM WSI series (``.dcm`` files) is one slide; otherwise its slide files
    and its sub-folders that hold a DICOM series are listed (one level down, not recursively).
    """
    from zoo.slide import dicom_series_file

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            if dicom_series_file(p) is not None:
                found.append(p)
                continue
            for c in sorted(p.iterdir()):
                if c.is_dir() and (c.suffix.lower() == ".mrxs" or dicom_series_file(c) is not None):
                    found.append(c)
                elif c.is_file() and c.suffix.lower() in SLIDE_SUFFIXES and c.suffix.lower() != ".dcm":
                    found.append(c)
        elif any(ch in item for ch in "*?[") and not p.exists():
            found.extend(Path(m) for m in sorted(glob.glob(item)))
        else:
            found.append(p)
    seen: set[Path] = set()
    out = []
    for p in found:
        key = _resolved(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


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


# --------------------------------------------------------------------------- result folder names


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def slide_stem(slide: Path) -> str:
    """The slide's name without its suffix (``x.ome.tif`` -> ``x``; a DICOM series folder -> its name)."""
    if slide.is_dir():
        return slide.name
    stem = slide.stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def safe_name(stem: str) -> str:
    """A result folder name from a slide's file stem: ``[A-Za-z0-9._-]``, no leading dot, never empty."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")
    name = name[:MAX_NAME_CHARS].rstrip(".")
    return name or "slide"


def slide_tag(slide: Path) -> str:
    """8 hex digits of the slide's resolved path (disambiguates colliding names, deterministically)."""
    return hashlib.sha256(str(_resolved(slide)).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _owner(folder: Path) -> tuple[str | None, str | None]:
    """(resolved slide path, model name) whose results ``folder`` holds (from its run.json), else Nones."""
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(info, dict):
        return None, None
    src = (info.get("source") or {}).get("resolved_path") if isinstance(info.get("source"), dict) else None
    model = info.get("model")
    name = str(model.get("id", "")).partition("@")[0] if isinstance(model, dict) else None
    return (src if isinstance(src, str) else None), (name or None)


def writable_for(folder: Path, slide: Path, model: str | None = None) -> bool:
    """True when a run of ``model`` (a name or ``name@version``) on ``slide`` may write into ``folder``: it
    does not exist, is an empty real folder, or its run.json says it holds this slide's results from this
    model (any version; a run.json still being replaced names no model and counts as this model's).
    Anything else (a symlink, a file, another slide's or another model's results, files of unknown
    origin, a run.json without a source) is never written into."""
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    src, owner_model = _owner(folder)
    if src is None:
        return not any(folder.iterdir())
    wanted = model.partition("@")[0] if model else None
    return src == str(_resolved(slide)) and (wanted is None or owner_model in (None, wanted))


def holds_other_model(folder: Path, slide: Path, model: str | None) -> bool:
    """True when ``folder`` holds ``slide``'s results from a model other than ``model``."""
    src, owner_model = _owner(folder)
    wanted = model.partition("@")[0] if model else None
    return src == str(_resolved(slide)) and None not in (owner_model, wanted) and owner_model != wanted


def result_dirs(slides: Sequence[Path], out_dir: str | Path, model: str | None = None) -> dict[Path, Path]:
    """Each slide's result folder inside ``out_dir`` for ``model`` (see the module docstring for the rules)."""
    out = Path(out_dir)
    groups: dict[str, set[Path]] = {}
    for s in slides:
        groups.setdefault(safe_name(slide_stem(s)).casefold(), set()).add(_resolved(s))
    model_tag = safe_name(model.partition("@")[0]) if model else ""
    dirs: dict[Path, Path] = {}
    for s in slides:
        base = safe_name(slide_stem(s))
        shared = len(groups[base.casefold()]) > 1
        name = base
        if not shared and not writable_for(out / base, s, model) and holds_other_model(out / base, s, model):
            name = f"{base[: MAX_NAME_CHARS - len(model_tag) - 1]}-{model_tag}"
        if shared or not writable_for(out / name, s, model):
            name = f"{name[: MAX_NAME_CHARS - 9]}-{slide_tag(s)}"
        dest = out / name
        if _resolved(dest).parent != _resolved(out):  # cannot happen with safe_name; never trust it blindly
            raise OutputError(f"{s}: result folder {dest} would leave {out}; rename the slide")
        dirs[s] = dest
    return dirs


# --------------------------------------------------------------------------- locking and leftovers


@contextlib.contextmanager
def result_lock(dest: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of result folder ``dest`` (waits for another zoo process holding it).

    The lock is ``<out>/.<name>.zoo-lock``. zoo writes ``LOCK_TEXT`` into the lock files it creates
    and removes on release only such a file (a file of that name that zoo did not write is used
    as the lock but never deleted); a waiter that wakes on a lock file that was removed meanwhile
    opens the new one, so two holders never coexist.
    """
    path = dest.parent / f".{dest.name}.zoo-lock"
    told = False
    while True:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
                os.write(fd, LOCK_TEXT)
            except FileExistsError:
                fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # removed between the two opens: try again
        except OSError as err:
            raise OutputError(
                f"{dest.parent}: cannot write results here ({err.strerror}); choose a writable --out folder"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait and not told:
                on_wait(f"{dest}: another zoo process is writing these results; waiting for it")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.pread(fd, len(LOCK_TEXT), 0) == LOCK_TEXT:  # only a lock file zoo itself wrote
                os.unlink(path)
        os.close(fd)


def remove_stale_partials(dest: Path) -> int:
    """Remove partial folders of ``dest`` left by a killed run (call with its lock held); return how many."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.partial$")
    n = 0
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            if pattern.match(p.name) and p.is_dir() and not p.is_symlink() and (p / PARTIAL_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def check_writable(out_dir: str | Path) -> None:
    """Fail early (before any inference) if results cannot be written to ``out_dir``."""
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: --out is a file, not a folder; choose a folder")
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".zoo-write-test.", dir=out)
        os.close(fd)
        os.unlink(name)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"{out}: cannot write results here ({err.strerror}); choose a writable --out folder") from err


# --------------------------------------------------------------------------- resume


def slide_identity(slide: Path) -> dict[str, Any]:
    """What identifies a slide's content cheaply: resolved path, size and modification time
    (for a DICOM series folder: the total size and the newest time of its files)."""
    if slide.is_dir():
        stats = [c.stat() for c in slide.iterdir() if c.is_file()]
        size, mtime = sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    else:
        st = slide.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"resolved_path": str(_resolved(slide)), "size_bytes": size, "mtime_ns": mtime}


def request_of(cfg: JobConfig, entry: ModelEntry) -> dict[str, Any]:
    """The options that change a result (not speed options such as threads or batch size)."""
    r = cfg.run
    return {
        "model": entry.id,
        "sha256": entry.weights.sha256 if not entry.stages else entry.pinned_sha256(),
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


def probability_file(class_name: str) -> str:
    """File name of a class's probability TIFF."""
    return f"probability_{safe_name(class_name)}.tiff"


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
        return _run_locked(slide_path, cfg, reg, entry, dest, rerun_reason=None if cfg.force else why)


def _run_locked(
    slide_path: Path, cfg: JobConfig, reg: Registry, entry: ModelEntry, dest: Path, rerun_reason: str | None
) -> JobResult:
    from bridge.geojson import ClassStyle, mask_to_feature_collection
    from zoo.engines.model import OnnxModel
    from zoo.engines.select import EngineChoice, gpu_engines
    from zoo.kinds import predict
    from zoo.labelmask import UNKNOWN_LABEL
    from zoo.outputs import current_umask, write_json, write_mask_tiff
    from zoo.pictures import render_overview, sample_mask
    from zoo.runner import background_premask
    from zoo.slide import thumbnail
    from zoo.verify import select_engine

    networks = entry.networks()
    stage_files = {name: verified_model_files(view, reg) for name, view in networks}
    files = [p for name, _ in networks for p in stage_files[name]]

    def choose(view: ModelEntry, precision: str) -> EngineChoice:
        gpu = gpu_engines(view, cfg.engine, cfg.run.providers, cfg.run.device)
        return select_engine(view, reg, cfg.engine, precision, gpu=gpu)

    engine = choose(entry, cfg.precision)
    stage_engines = {name: engine if view is entry else choose(view, "auto") for name, view in networks}
    identity = slide_identity(slide_path)
    t0 = time.perf_counter()
    with (
        open_slide(slide_path, backend=cfg.backend, on_bad_tile=cfg.on_bad_tile) as slide,  # type: ignore[arg-type]
        ThreadPoolExecutor(1, thread_name_prefix="premask") as side,
    ):
        # the thumbnail pre-mask (~0.3 s) is computed while the engines load and compile (~0.3 s for OpenVINO)
        uses_premask = entry.input.mode != "whole-slide" and entry.selection.tissue_premask and cfg.run.skip_background
        premask = side.submit(background_premask, slide) if uses_premask and cfg.run.premask is None else None
        models = {
            name: OnnxModel(
                stage_files[name][0],
                view,
                cfg.run.providers,
                cfg.run.threads,
                cfg.run.device,
                stage_engines[name].engine,
                stage_engines[name].precision,
                cfg.run.batch_size,
            )
            for name, view in networks
        }
        model = models[entry.stage_name]
        run_opts = replace(cfg.run, premask=premask.result()) if premask is not None else cfg.run
        pred = predict(slide, entry, models, run_opts)
        slide_info = slide.describe()
        thumb, thumb_ds = thumbnail(slide, max_side_px=1024)
    choice = pred.choice
    mpp0 = choice.mpp0 if choice else (slide_info["mpp"] or cfg.run.slide_mpp)
    mpp_source = choice.mpp_source if choice else ("file" if slide_info["mpp"] else "--slide-mpp")
    mpp0_assumed = mpp_source in ("assumed default", "objective power")
    # QuPath classification per class (``qupath_name``, e.g. "Ignore*" for regions to leave out)
    classes = [ClassStyle(c.index, c.qupath_name or c.name, tuple(c.color), c.qupath_name) for c in entry.classes]  # type: ignore[arg-type]
    fractions = pred.class_fractions()
    mean_prob = pred.mean_class_probability()
    mask_mpp = None if mpp0 is None else mpp0 * pred.downsample
    areas = {
        c.name: {
            "fraction": round(float(fractions.get(c.index, 0.0)), 5),
            "area_mm2": None
            if mask_mpp is None
            else round(float(fractions.get(c.index, 0.0)) * pred.mask.size * mask_mpp**2 / 1e6, 4),
            "mean_probability": None if c.index not in mean_prob else round(mean_prob[c.index], 4),
        }
        for c in entry.classes
    }
    if fractions.get(UNKNOWN_LABEL):
        f = float(fractions[UNKNOWN_LABEL])
        areas["Unknown (undecodable tiles)"] = {
            "fraction": round(f, 5),
            "area_mm2": None if mask_mpp is None else round(f * pred.mask.size * mask_mpp**2 / 1e6, 4),
        }
    work = _make_partial(dest)
    try:
        outputs: dict[str, str] = {}
        meta = {
            "model": entry.id,
            "downsample": pred.downsample,
            "mpp": mask_mpp,
            "classes": [
                {"index": c.index, "name": c.name, "color": list(c.color)}
                | ({"qupath_name": c.qupath_name} if c.qupath_name else {})
                for c in entry.classes
            ],
            "slide": str(slide_path),
        }
        if "tiff" in cfg.formats:
            cmap = {c.index: tuple(c.color) for c in entry.classes}
            if pred.stats.get("bad_tiles"):
                cmap[UNKNOWN_LABEL] = (128, 128, 128)
            write_mask_tiff(
                work / RESULT_FILES["tiff"],
                pred.mask,
                mask_mpp,
                colormap=cmap,  # type: ignore[arg-type]
                description=json.dumps(meta),
            )
            outputs["mask"] = RESULT_FILES["tiff"]
        if "probability" in cfg.formats:
            for c in entry.foreground:
                name = probability_file(c.name)
                write_mask_tiff(
                    work / name,
                    pred.probabilities[c.index],
                    mask_mpp,
                    description=json.dumps({**meta, "class": c.name, "values": "probability x 255"}),
                )
                outputs[f"probability_{c.name}"] = name
        if "geojson" in cfg.formats:
            fc = mask_to_feature_collection(
                pred.mask,
                [c for c in classes if c.index != 0],
                downsample=pred.downsample,
                mpp0=mpp0,
                simplify_um=cfg.simplify_um,
                min_area_um2=cfg.min_area_um2,
                object_type=cfg.object_type,  # type: ignore[arg-type]
                probabilities=pred.probabilities,
            )
            write_json(work / RESULT_FILES["geojson"], fc)
            outputs["geojson"] = RESULT_FILES["geojson"]
            outputs["geojson_features"] = str(len(fc["features"]))
            for c in entry.classes:
                areas[c.name]["objects"] = sum(
                    f["properties"]["classification"]["name"] == (c.qupath_name or c.name) for f in fc["features"]
                )
        write_class_table(work / RESULT_FILES["table"], areas)
        outputs["table"] = RESULT_FILES["table"]
        caption = f"{entry.id} · mask at {mask_mpp:.2f} µm/px" if mask_mpp else f"{entry.id}"
        caption += f" · {slide_path.name}"
        if mpp0_assumed:
            caption += f" · slide resolution ASSUMED {mpp0:g} µm/px ({mpp_source})"
        render_overview(
            work / RESULT_FILES["picture"],
            thumb,
            sample_mask(pred.mask, thumb.shape[:2], thumb_ds / pred.downsample),
            entry.classes,
            None if mpp0 is None else mpp0 * thumb_ds,
            caption,
            areas,
        )
        outputs["picture"] = RESULT_FILES["picture"]
        run_info = {
            "zoo_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "arguments": asdict(cfg),
            "request": request_of(cfg, entry),
            "source": identity,
            "rerun_reason": rerun_reason,
            "versions": versions(),
            "model": {
                "id": entry.id,
                "kind": entry.kind,
                "sha256": entry.weights.sha256,
                "files": [{"path": str(p), "sha256": s} for p, s in zip(files, entry.pinned_sha256())],
                "stages": {n: {"engine": e.engine, "precision": e.precision} for n, e in stage_engines.items()},
                "weights": str(files[0]),
                "licence": entry.licence,
            },
            "providers": model.providers,
            "engine": {
                "engine": engine.engine,
                "precision": engine.precision,
                "why": engine.reason,
                "considered": engine.considered,
            },
            "slide": slide_info,
            "resolution": {
                "level": choice.level if choice else None,
                "extra_downsample": choice.factor if choice else None,
                "mask_downsample": pred.downsample,
                "mask_mpp": mask_mpp,
                "slide_mpp": mpp0,
                "slide_mpp_source": mpp_source,
                "slide_mpp_assumed": mpp0_assumed,
            },
            "classes": areas,
            "stats": pred.stats,
            "seconds": round(time.perf_counter() - t0, 3),
            "outputs": outputs,
            "warnings": resolution_warnings(entry, cfg, choice),
        }
        write_json(work / "run.json", run_info)
        raise_if_signalled()  # a stop request a library swallowed: still nothing published
        _publish(work, dest, current_umask())
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        pred.close()
    warnings = list(run_info["warnings"])
    pre = pred.stats.get("premask_tissue_fraction")
    found_none = not any(fractions.get(c.index, 0.0) for c in entry.foreground)
    if entry.task == "tissue-segmentation" and pre and pre > 0 and found_none:  # for tumour models "none" is an answer
        run_mpp = choice.mpp if choice else pred.mpp
        warnings.append(
            f"the pre-mask sees tissue ({pre:.1%} of the slide) but the model found none at {run_mpp:g} µm/px: "
            "small tissue may vanish at a coarse resolution; try a finer --mpp (e.g. --mpp 2 or 1)"
        )
    summary = {
        "model": entry.id,
        "classes": areas,
        "seconds": run_info["seconds"],
        "level": run_info["resolution"],
        "slide_mpp_source": mpp_source,
        "bad_tiles": len(pred.stats.get("bad_tiles", [])),
        "rerun_reason": rerun_reason,
        "engine": f"{engine.engine} {engine.precision}",
        "tiles_run": pred.stats.get("tiles_run"),
        "tiles_total": pred.stats.get("tiles_total"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "warnings": warnings,
    }
    return JobResult(str(slide_path), "ok", str(dest), summary=summary)


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


def write_class_table(dest: Path, areas: dict[str, dict[str, Any]]) -> None:
    """``classes.csv``: one row per class: area, fraction, objects in the GeoJSON, mean probability."""
    from zoo.outputs import atomic_path

    cols = ["class", "area_mm2", "fraction", "objects", "mean_probability"]
    with atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, a in areas.items():
            w.writerow([name, *("" if a.get(k) is None else a.get(k) for k in cols[1:])])


def _make_partial(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        (work / PARTIAL_MARKER).write_text(f"{os.getpid()}\n", encoding="utf-8")
    except OSError as err:
        raise OutputError(
            f"{dest.parent}: cannot write results here ({err.strerror}); choose a writable --out folder"
        ) from err
    return work


def _publish(work: Path, dest: Path, umask: int) -> None:
    """Move a finished partial folder into place; into an existing own folder file by file, run.json last."""
    (work / PARTIAL_MARKER).unlink()
    try:
        if not dest.exists():
            work.chmod(0o777 & ~umask)
            work.rename(dest)
            return
        # until the end the folder reads as this slide's (so a killed run can be redone) but incomplete
        info = json.loads((work / "run.json").read_text(encoding="utf-8"))
        marker = {"source": info["source"], "status": "being replaced; rerun to finish"}
        tmp = dest / ".run.json.replacing"
        tmp.write_text(json.dumps(marker), encoding="utf-8")
        os.replace(tmp, dest / "run.json")
        names = sorted((p.name for p in work.iterdir()), key=lambda n: n == "run.json")
        for name in names:
            os.replace(work / name, dest / name)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OutputError(f"{dest}: no space left on the device; free space or choose another --out") from err
        raise OutputError(f"{dest}: cannot move results into place ({err.strerror}); check --out") from err


def run_slide_safe(
    slide_path: str | Path,
    cfg: JobConfig,
    dest: str | Path | None = None,
    on_message: Callable[[str], None] | None = None,
) -> JobResult:
    """:func:`run_slide` that reports failures as a result instead of raising (for batches)."""
    try:
        return run_slide(slide_path, cfg, dest=Path(dest) if dest else None, on_message=on_message)
    except ZooError as err:
        msg = str(err)
        if str(slide_path) not in msg:  # a model's or an output's error: say which slide it stopped
            msg = f"{slide_path}: {msg}"
        return JobResult(str(slide_path), "failed", str(dest) if dest else None, error=msg)
    except MemoryError:
        return JobResult(str(slide_path), "failed", error=f"{slide_path}: out of memory; use a coarser --mpp")
    except Exception as err:  # an unexpected bug on one slide must not stop the batch
        tb = traceback.format_exception_only(type(err), err)[-1].strip()
        return JobResult(str(slide_path), "failed", error=f"{slide_path}: unexpected error: {tb}")


def run_many(
    slides: Sequence[Path],
    cfg: JobConfig,
    on_result: Callable[[int, JobResult], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> list[JobResult]:
    """Run slides one after another in this process; failures are collected, not raised."""
    dirs = result_dirs(slides, cfg.out_dir, cfg.model)
    results = []
    for k, s in enumerate(slides):
        label = f"[{k + 1}/{len(slides)}] {s.name}"
        r = run_slide_safe(s, replace(cfg, run=replace(cfg.run, progress_label=label)), dirs[s], on_message)
        results.append(r)
        if on_result:
            on_result(k, r)
    return results


def run_many_dask(
    slides: Sequence[Path],
    cfg: JobConfig,
    scheduler: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    on_result: Callable[[int, JobResult], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[JobResult]:
    """Run slides on a Dask cluster: ``scheduler`` address, or a local cluster of ``workers`` processes.

    Each task runs one slide; the ONNX session uses ``cfg.run.threads`` threads per worker.
    ``progress`` shows a batch-level bar (slides done) on stderr; ``on_message`` is told the
    dashboard address when the cluster has one.

    Raises:
        ZooError: dask is not installed, or the scheduler cannot be reached.
    """
    from zoo.errors import DependencyError

    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise DependencyError(
            "--workers/--scheduler need Dask, which is not installed; "
            "install it with: pip install 'pathology-zoo[dask]'"
        ) from err

    cfg = replace(cfg, run=replace(cfg.run, progress=False))
    dirs = result_dirs(slides, cfg.out_dir, cfg.model)
    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="10s")
        else:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None
            )
            client = Client(cluster)
    except (OSError, TimeoutError) as err:
        raise OutputError(
            f"{scheduler}: cannot reach the Dask scheduler ({type(err).__name__}); check the address "
            "(tcp://host:8786) and that the scheduler is running"
        ) from err
    from tqdm import tqdm

    bar = tqdm(total=len(slides), desc="slides", unit="slide", file=sys.stderr, disable=not progress, leave=False)
    try:
        link = None
        if scheduler:  # the local cluster runs without a dashboard (it would need bokeh)
            with contextlib.suppress(Exception):
                link = client.dashboard_link
        if on_message:
            where = scheduler or f"a local cluster of {workers} worker processes"
            on_message(f"running {len(slides)} slide(s) on Dask: {where}" + (f"; dashboard {link}" if link else ""))
        order = {str(s): k for k, s in enumerate(slides)}
        futures = [client.submit(run_slide_safe, str(s), cfg, str(dirs[s]), pure=False) for s in slides]
        results: list[JobResult | None] = [None] * len(slides)
        for fut in as_completed(futures):
            r = fut.result()
            k = order[r.slide]
            results[k] = r
            bar.update(1)
            if on_result:
                on_result(k, r)
        return [r for r in results if r is not None]
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- batch summary


def summary_row(r: JobResult) -> dict[str, Any]:
    """One row of ``summary.csv`` for a slide's result (a skipped slide's figures come from its run.json)."""
    s = dict(r.summary)
    if r.status == "skipped" and r.out:
        try:
            info = json.loads((Path(r.out) / "run.json").read_text(encoding="utf-8"))
            s.update(
                model=info["model"]["id"],
                classes=info["classes"],
                level=info["resolution"],
                tiles_run=info["stats"].get("tiles_run"),
                tiles_total=info["stats"].get("tiles_total"),
                seconds=info.get("seconds"),
            )
        except (OSError, ValueError, KeyError):
            pass
    res = s.get("level") or {}
    areas = s.get("classes") or {}
    message = r.error if r.status == "failed" else s.get("reason") or "; ".join(s.get("warnings") or [])
    return {
        "slide": r.slide,
        "status": r.status,
        "message": message or "",
        "model": s.get("model", ""),
        "result_folder": r.out if r.status != "failed" else "",
        "level": res.get("level", ""),
        "mask_mpp": "" if res.get("mask_mpp") is None else round(res["mask_mpp"], 4),
        "slide_mpp": "" if res.get("slide_mpp") is None else round(res["slide_mpp"], 4),
        "slide_mpp_source": res.get("slide_mpp_source", ""),
        "resolution_assumed": res.get("slide_mpp_assumed", ""),
        "classes": "; ".join(
            f"{k} {v['area_mm2']} mm2 ({v['fraction']:.2%})"
            if v.get("area_mm2") is not None
            else f"{k} {v['fraction']:.2%}"
            for k, v in areas.items()
            if k.lower() != "background"
        ),
        "tiles_run": s.get("tiles_run", ""),
        "tiles_total": s.get("tiles_total", ""),
        "seconds": s.get("seconds", ""),
        "peak_rss_mb": s.get("peak_rss_mb", ""),
        "areas": areas,
    }


def _earlier_rows(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a summary.csv zoo wrote earlier into the same --out, for (slide, model) pairs this batch did not
    run and whose result folder still exists (a second model's run keeps the first model's row)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != SUMMARY_COLUMNS:
                return []
            old = list(reader)
    except (OSError, ValueError, csv.Error):
        return []

    def key(r: dict[str, Any]) -> tuple[str, str]:
        return str(_resolved(Path(str(r.get("slide", ""))))), str(r.get("model", "")).partition("@")[0]

    now = {key(r) for r in rows}
    folders = {str(r.get("result_folder")) for r in rows}
    return [
        r
        for r in old
        if r.get("status") != "failed"
        and key(r) not in now
        and r.get("result_folder") not in folders
        and Path(r.get("result_folder") or "\0").is_dir()
    ]


def write_batch_summary(out_dir: str | Path, results: Sequence[JobResult]) -> tuple[Path | None, Path | None]:
    """``summary.csv`` and ``summary.html`` in ``out_dir``; a file of that name that zoo did not write is kept,
    and then that summary is not written (returned as None)."""
    from zoo.outputs import atomic_path
    from zoo.pictures import write_summary_html

    out = Path(out_dir)
    rows = [summary_row(r) for r in results]
    rows = _earlier_rows(out / "summary.csv", rows) + rows
    csv_path: Path | None = out / "summary.csv"
    html_path: Path | None = out / "summary.html"
    assert csv_path is not None and html_path is not None
    if csv_path.exists() and not csv_path.read_text(encoding="utf-8", errors="replace").startswith(
        ",".join(SUMMARY_COLUMNS)
    ):
        csv_path = None
    else:
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if html_path.exists() and "zoo batch summary" not in html_path.read_text(encoding="utf-8", errors="replace"):
        html_path = None
    else:
        write_summary_html(html_path, rows)
    return csv_path, html_path

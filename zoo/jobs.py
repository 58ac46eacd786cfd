"""Many slides, locally or on Dask: the batch around :func:`zoo.slide_job.run_slide`, and its summary.

Which folder each slide's results go to, and why nothing outside them is ever touched, is
:mod:`zoo.results`; one slide's job, step by step, is :mod:`zoo.slide_job`. ``summary.csv`` and
``summary.html`` in ``--out`` list every slide of the batch, and keep the rows of earlier runs into the
same ``--out`` whose folders still exist.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from zoo.errors import OutputError, ZooError
from zoo.results import check_writable, resolved, result_dirs, safe_name
from zoo.slide_job import FORMATS, JobConfig, JobResult, run_slide

__all__ = [
    "FORMATS",
    "JobConfig",
    "JobResult",
    "check_writable",
    "expand_slides",
    "result_dirs",
    "run_many",
    "run_many_dask",
    "run_slide",
    "run_slide_safe",
    "safe_name",
    "summary_row",
    "write_batch_summary",
]

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".btf", ".qptiff", ".dcm",
)  # fmt: skip
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
        key = resolved(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


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
        return str(resolved(Path(str(r.get("slide", ""))))), str(r.get("model", "")).partition("@")[0]

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

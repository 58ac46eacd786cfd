"""``zoo run`` and ``zoo demo``: models on slides, one result folder per slide, a batch summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zoo.cli.common import Console, bundled_slide, emit_json
from zoo.cli.options import add_run_options
from zoo.errors import OutputError, ProviderError


def add_run(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo run`` command's options."""
    p = sub.add_parser("run", help="run a model on slides (files, folders or globs)", formatter_class=fmt)
    p.add_argument("model", help="NAME or NAME@VERSION (see `zoo list`)")
    p.add_argument("slides", nargs="+", help="slide files, folders of slides, or quoted globs")
    add_run_options(p)


def add_demo(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo demo`` command's options."""
    p = sub.add_parser("demo", help="run the default model on the bundled real slide", formatter_class=fmt)
    add_run_options(p)


def cmd_demo(args: argparse.Namespace) -> int:
    """``zoo demo``: the default model on the bundled real slide."""
    args.model = None
    return cmd_run(args, slides=[str(bundled_slide())])


def cmd_run(args: argparse.Namespace, slides: list[str] | None = None) -> int:
    """``zoo run``: check the request once, then run every slide (here or on Dask) and summarise the batch."""
    from zoo.jobs import expand_slides, run_many, run_many_dask
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    entry = reg.get(getattr(args, "model", None) or reg.default_model)  # unknown model: fail before any slide
    paths = expand_slides(slides if slides is not None else args.slides)
    if not paths:
        print(f"error: no slides found in {args.slides}; pass slide files, a folder or a quoted glob", file=sys.stderr)
        return 1
    check_request(args, reg, entry)
    try:
        con = Console(args.quiet, args.json, args.log)
    except OSError as err:
        raise OutputError(f"{args.log}: cannot write the log ({err.strerror}); choose another --log file") from err
    if entry.warning:
        con.warn(f"warning: {entry.id}: {entry.warning}")
    cfg = job_config(args, entry)
    report = reporter(con, len(paths))
    try:
        if args.workers or args.scheduler:
            results = run_many_dask(
                paths,
                cfg,
                scheduler=args.scheduler,
                workers=max(1, args.workers),
                on_result=report,
                on_message=con.note,
                progress=cfg.run.progress,
            )
        else:
            results = run_many(paths, cfg, on_result=report, on_message=con.note)
        return finish(args, con, results)
    finally:
        con.close()


def check_request(args: argparse.Namespace, reg: Any, entry: Any) -> None:
    """Everything that would fail every slide fails here, once, before any output: providers, GPU, pinned
    files of every stage, an engine/precision the entry or machine does not allow, an unwritable --out.

    Raises:
        ZooError: the one line to print.
    """
    from zoo.engines.onnxruntime_engine import check_providers
    from zoo.engines.select import gpu_engines
    from zoo.jobs import check_writable
    from zoo.registry import verified_model_files
    from zoo.verify import select_engine

    if args.providers:
        check_providers(args.providers)
    if args.device is not None and args.engine == "onnxruntime":
        check_providers(["CUDAExecutionProvider"])
    for _, view in entry.networks():  # a tampered or mismatched network, any stage, fails once, before any output
        for precision in view.precisions:  # the fp32 file and each precision's own copy (int8)
            verified_model_files(view, reg, precision)
    gpu = gpu_engines(entry, args.engine, args.providers, args.device)
    if args.device is not None and not gpu:  # never a silent fall-back to the CPU
        raise ProviderError(
            f"--device {args.device}: no engine here runs {entry.id} on a GPU (onnxruntime has no CUDA provider, "
            "and torch sees no CUDA GPU or is not allowed by the entry); to get one: pip install '.[gpu]' "
            "(onnxruntime-gpu), or a CUDA build of torch with --engine torch"
        )
    select_engine(entry, reg, args.engine, args.precision, gpu=gpu)  # an impossible request fails here, once
    check_writable(args.out)  # before any inference


def job_config(args: argparse.Namespace, entry: Any) -> Any:
    """The :class:`zoo.jobs.JobConfig` of the command line's options."""
    from zoo.jobs import JobConfig
    from zoo.runner import RunOptions

    run = RunOptions(
        target_mpp=args.mpp,
        level=args.level,
        slide_mpp=args.slide_mpp,
        force_slide_mpp=args.force_slide_mpp,
        batch_size=args.batch_size,
        providers=args.providers,
        threads=args.threads,
        reader_threads=args.reader_threads,
        skip_background=args.skip_background,
        progress=args.progress and not args.quiet and sys.stderr.isatty(),
        device=args.device,
    )
    return JobConfig(
        model=entry.id,
        registry_path=args.registry,
        out_dir=args.out,
        formats=tuple(args.formats),
        backend=args.backend,
        run=run,
        simplify_um=args.simplify_um,
        min_area_um2=args.min_area_um2,
        object_type=args.object_type,
        force=args.force,
        on_bad_tile=args.on_bad_tile,
        engine=args.engine,
        precision=args.precision,
    )


def reporter(con: Console, total: int) -> Callable[[int, Any], None]:
    """One line per slide as it finishes (warnings and errors on stderr)."""

    def report(k: int, r: Any) -> None:
        where = f"[{k + 1}/{total}]"
        if r.status == "failed":
            con.warn(f"error: {where} {r.error}")
            return
        if r.status == "ok" and r.summary.get("slide_mpp_source") in ("assumed default", "objective power"):
            mpp = r.summary.get("level", {}).get("slide_mpp")
            con.warn(
                f"warning: {where} {r.slide} has no resolution metadata; assumed {mpp:g} µm/px at level 0 "
                f"({r.summary['slide_mpp_source']}); pass --slide-mpp if that is wrong"
            )
        if r.status == "ok" and r.summary.get("bad_tiles"):
            con.warn(
                f"warning: {where} {r.slide}: {r.summary['bad_tiles']} undecodable tile(s) masked as unknown "
                "(listed in run.json)"
            )
        for w in r.summary.get("warnings", []):
            con.warn(f"warning: {where} {r.slide}: {w}")
        if r.status == "ok":
            areas = ", ".join(
                f"{k} {v['area_mm2']:.3f} mm² ({v['fraction']:.1%})"
                if v["area_mm2"] is not None
                else f"{k} {v['fraction']:.1%}"
                for k, v in r.summary.get("classes", {}).items()
                if k.lower() != "background"
            )
            con.info(f"{where} ok: {r.slide} -> {r.out}: {areas} [{r.summary.get('engine', '')}]")
        else:
            con.info(f"{where} {r.status}: {r.slide} -> {r.out}: {r.summary.get('reason', '')}")

    return report


def finish(args: argparse.Namespace, con: Console, results: list[Any]) -> int:
    """The batch summary (unless every slide failed: then the error lines are all there is to say), the
    ``--json`` results, where to look, and the exit code."""
    from zoo.jobs import summary_row, write_batch_summary

    ran = any(r.status != "failed" for r in results)
    csv_path, html_path = write_batch_summary(args.out, results) if ran else (Path(), Path())
    if args.json:
        emit_json([asdict(r) for r in results])
    if len(results) > 1:
        con.info(batch_table([summary_row(r) for r in results]))
    for name, p in (("summary.csv", csv_path), ("summary.html", html_path)):
        if p is None:
            con.warn(f"warning: {Path(args.out) / name} exists and was not written by zoo; left as it is")
    if ran and html_path is not None and len(results) > 1:
        con.note(f"pictures of every slide: {html_path}")
    elif len(results) == 1 and results[0].status != "failed" and results[0].out:
        con.note(f"picture: {Path(results[0].out) / 'overview.png'}")
    failed = sum(r.status == "failed" for r in results)
    if failed and len(results) > 1:
        con.warn(f"{failed} of {len(results)} slides failed")
    return 1 if failed else 0


def batch_table(rows: list[dict[str, Any]]) -> str:
    """The batch summary as an aligned text table."""
    cols = [("status", 7), ("slide", 34), ("mask_mpp", 8), ("tiles_run", 9), ("seconds", 8), ("classes", 0)]
    head = "  ".join(f"{c:<{w}}" if w else c for c, w in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c, w in cols:
            v = str(r.get(c, "")) if c != "slide" else Path(r["slide"]).name
            if c == "classes" and r["status"] == "failed":
                v = str(r.get("message", ""))[:100]
            cells.append(f"{v[:w]:<{w}}" if w else v)
        lines.append("  ".join(cells))
    return "\n".join(lines)

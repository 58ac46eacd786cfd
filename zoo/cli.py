"""The ``zoo`` command line. Exit codes: 0 success, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from zoo.engines import ENGINES
from zoo.errors import (
    FplError,
    GeoJSONError,
    OutputError,
    ProviderError,
    Terminated,
    ZooError,
    forget_signals,
    on_stop_signal,
)

EPILOG = "Models: `zoo list`. Results of `zoo run` go to OUT/<slide name>/ (mask.tiff, annotations.geojson, run.json)."


def bundled_slide() -> Path:
    """The real slide shipped with the package (CMU-1-Small-Region, CC0, Aperio SVS)."""
    return Path(str(resources.files("zoo") / "data" / "cmu-1-small-region.svs"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once, and none for flags or options whose default is 'not given'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number greater than 0")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 <= v < math.inf):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number, 0 or more")
    return v


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text} must be {lo} or more")
        return v

    return parse


def class_mapping(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=CLASS``."""
    name, sep, target = text.partition("=")
    if not sep or not name or not target:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=CLASS (for example Tumor=Tissue or 'Region*=Tissue')")
    return name, target


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        _emit_json(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            print(f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    else:
        print(obj)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out", help="results folder (one sub-folder per slide)")
    p.add_argument(
        "--on-bad-tile",
        choices=["fail", "skip"],
        default="fail",
        help="a slide tile that cannot be decoded fails the slide, or (skip) is masked as unknown and "
        "listed in run.json (tifffile reader only)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=["tiff", "geojson", "probability"],
        default=["tiff", "geojson", "probability"],
        help="outputs: label mask TIFF, QuPath GeoJSON, per-class probability TIFFs (classes.csv and run.json always)",
    )
    p.add_argument(
        "--mpp", type=positive_float, default=None, help="run at this µm/px (default: the model's target_mpp)"
    )
    p.add_argument("--level", type=int_at_least(0), default=None, help="run on this pyramid level instead of --mpp")
    p.add_argument(
        "--slide-mpp",
        type=positive_float,
        default=None,
        help="level-0 µm/px of slides WITHOUT resolution metadata (default: from the objective power, else 0.5); "
        "refused for slides that state another one, unless --force-slide-mpp",
    )
    p.add_argument(
        "--force-slide-mpp",
        action="store_true",
        help="use --slide-mpp even for slides whose metadata states another resolution",
    )
    p.add_argument("--backend", choices=["auto", "openslide", "tifffile"], default="auto", help="slide reader")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="tiles per ONNX Runtime call")
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="ONNX Runtime execution providers (default: CUDA if available, then CPU)",
    )
    p.add_argument("--threads", type=int_at_least(0), default=0, help="CPU inference threads (0: one per core)")
    p.add_argument(
        "--reader-threads",
        type=int_at_least(1),
        default=1,
        help="threads reading and decoding tiles ahead of inference (a GPU needs several to be fed)",
    )
    p.add_argument(
        "--engine",
        choices=["auto", *ENGINES],
        default="auto",
        help="inference engine; auto picks the fastest the model's entry allows here that passes its check",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="arithmetic precision; each is verified against fp32 on the model's bundled test before use",
    )
    p.add_argument(
        "--all-tiles",
        dest="skip_background",
        action="store_false",
        help="run every tile, also those the thumbnail pre-mask calls glass (default: glass is skipped)",
    )
    p.add_argument("--simplify-um", type=nonneg_float, default=2.0, help="polygon simplification tolerance in µm")
    p.add_argument("--min-area-um2", type=nonneg_float, default=500.0, help="drop objects smaller than this (µm²)")
    p.add_argument(
        "--object-type",
        choices=["annotation", "detection"],
        default="annotation",
        help="QuPath object type of the GeoJSON features",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run slides whose results match the request (results are reused only when model, options "
        "and slide are unchanged)",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(0),
        default=0,
        help="run slides on a local Dask cluster of N processes (0: no Dask; needs pip install '.[dask]')",
    )
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors (no progress, no result lines)")
    p.add_argument("--log", default=None, metavar="FILE", help="also append every message of the run to FILE")
    p.add_argument(
        "--device",
        type=int_at_least(0),
        default=None,
        help="GPU index for --engine torch (pip install '.[torch]' with a CUDA build of torch) or onnxruntime's "
        "CUDA provider (pip install '.[gpu]')",
    )
    p.add_argument(
        "--json", action="store_true", help="print per-slide results as JSON on stdout (and nothing else there)"
    )


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    ap = argparse.ArgumentParser(
        prog="zoo",
        description="Pathology model zoo: run registered WSI segmentation models "
        "and bridge their results to QuPath and FastPathology.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    ap.add_argument("--registry", default=None, help="registry.yaml to use (default: $ZOO_REGISTRY or the bundled one)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models", formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("info", help="show one model's registry entry", formatter_class=fmt)
    p.add_argument("model", help="NAME or NAME@VERSION")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "verify", help="check weights' sha256 and reproduce each model's bundled test output", formatter_class=fmt
    )
    p.add_argument("model", nargs="?", default=None, help="NAME[@VERSION] (default: every model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("inspect", help="describe a slide (levels, resolution, backend)", formatter_class=fmt)
    p.add_argument("slide", help="slide file")
    p.add_argument("--backend", choices=["auto", "openslide", "tifffile"], default="auto", help="slide reader")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("run", help="run a model on slides (files, folders or globs)", formatter_class=fmt)
    p.add_argument("model", help="NAME or NAME@VERSION (see `zoo list`)")
    p.add_argument("slides", nargs="+", help="slide files, folders of slides, or quoted globs")
    _add_run_options(p)

    p = sub.add_parser(
        "show",
        help="where a result's picture and tables are (OUT/<slide>), or a batch's summary (OUT)",
        formatter_class=fmt,
    )
    p.add_argument("result", help="a result folder written by `zoo run`, or its --out folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="run the default model on the bundled real slide", formatter_class=fmt)
    _add_run_options(p)

    p = sub.add_parser("convert", help="mask TIFF to QuPath GeoJSON, or GeoJSON to a mask TIFF", formatter_class=fmt)
    p.add_argument("source", help="mask.tiff written by `zoo run`, or a QuPath GeoJSON file")
    p.add_argument("--to", choices=["geojson", "tiff"], required=True, help="output format")
    p.add_argument("--out", required=True, help="output file (never one of the inputs; an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    p.add_argument(
        "--like",
        default=None,
        help="(GeoJSON to TIFF) a mask.tiff whose size, resolution and classes to use, or the slide the "
        "annotations were drawn on (a new mask at --mpp; classes from --model, else from the GeoJSON)",
    )
    p.add_argument(
        "--model", default=None, help="classes from this model (default: the mask's, else the default model)"
    )
    p.add_argument("--slide-mpp", type=positive_float, default=None, help="level-0 µm/px if the mask has none")
    p.add_argument(
        "--mpp",
        type=positive_float,
        default=2.0,
        help="(GeoJSON to TIFF with --like SLIDE) µm/px of the new mask",
    )
    p.add_argument("--simplify-um", type=nonneg_float, default=2.0, help="polygon simplification tolerance in µm")
    p.add_argument("--min-area-um2", type=nonneg_float, default=500.0, help="drop objects smaller than this (µm²)")
    p.add_argument(
        "--object-type", choices=["annotation", "detection"], default="annotation", help="QuPath object type"
    )
    p.add_argument(
        "--class-map",
        nargs="*",
        type=class_mapping,
        default=[],
        metavar="NAME=CLASS",
        help="map annotation class names onto model classes",
    )

    p = sub.add_parser(
        "edits",
        help="compare a prediction with a pathologist's edited GeoJSON; write the corrected mask",
        formatter_class=fmt,
    )
    p.add_argument("prediction", help="mask.tiff from `zoo run` (or its results folder)")
    p.add_argument("edited", help="GeoJSON exported from QuPath after editing")
    p.add_argument(
        "--out",
        default=None,
        help="corrected mask TIFF, with edits.png beside it (default: corrected.tiff beside the prediction); "
        "never one of the inputs, and an existing file needs --force",
    )
    p.add_argument("--force", action="store_true", help="replace an existing corrected mask and edits.png")
    p.add_argument(
        "--baseline",
        default=None,
        help="the GeoJSON the pathologist was given (default: annotations.geojson beside the prediction); "
        "changes are measured against it",
    )
    p.add_argument(
        "--class-map",
        nargs="*",
        type=class_mapping,
        default=[],
        metavar="NAME=CLASS",
        help="map edited class names onto model classes, e.g. Region*=Tissue",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export", help="export a model for another tool", formatter_class=fmt)
    esub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    f = esub.add_parser(
        "fast", help="FastPathology folder: pipelines/<name>.fpl + models/<name>.onnx", formatter_class=fmt
    )
    f.add_argument("model", help="NAME or NAME@VERSION")
    f.add_argument("dir", help="output folder")
    f.add_argument(
        "--engine", choices=["ONNXRuntime", "OpenVINO", "TensorRT"], default="ONNXRuntime", help="FAST inference engine"
    )
    f.add_argument("--force", action="store_true", help="replace files of an earlier export in that folder")
    f = esub.add_parser(
        "wsinfer",
        help="WSInfer model folder (config.json + TorchScript) for QuPath's WSInfer extension and the wsinfer CLI",
        formatter_class=fmt,
    )
    f.add_argument("model", help="NAME or NAME@VERSION (a patch classifier, or a cascade: its patch stage)")
    f.add_argument("--out", required=True, help="folder to write <name>-<version>/ into")
    f.add_argument("--force", action="store_true", help="replace an earlier zoo export of this model there")
    f = esub.add_parser(
        "bioimageio",
        help="bioimage.io model package (rdf.yaml 0.5, ONNX + TorchScript, test tensors) for segmentation models",
        formatter_class=fmt,
    )
    f.add_argument("model", help="NAME or NAME@VERSION (a single-input segmentation model)")
    f.add_argument("--out", required=True, help="folder to write <name>-<version>/ into")
    f.add_argument("--force", action="store_true", help="replace an earlier zoo export of this model there")
    f = esub.add_parser(
        "pipelines", help="(re)write the kept FAST pipelines of every registered model", formatter_class=fmt
    )
    f.add_argument("--dir", default=None, help="pipelines folder (default: beside the registry)")

    p = sub.add_parser(
        "register",
        help="add your own model (.onnx, bioimage.io package, WSInfer folder) to a user registry, verified",
        formatter_class=fmt,
    )
    p.add_argument("source", help="an .onnx file, a bioimage.io package (folder or rdf.yaml) or a WSInfer folder")
    p.add_argument(
        "--registry",
        default=argparse.SUPPRESS,
        help="the user registry to add it to (created if missing; never the bundled one); then use "
        "`zoo --registry FILE run NAME SLIDE`",
    )
    p.add_argument("--name", required=True, help="model name (lower case, digits, '-')")
    p.add_argument("--version", default="0.1.0", help="semver of this entry")
    p.add_argument(
        "--classes", default=None, help="comma-separated class names, index 0 first (e.g. Background,Tissue)"
    )
    p.add_argument("--mpp", type=float, default=None, help="um/px the model runs at (read from a package if it says)")
    p.add_argument("--scale", type=float, default=None, help="network input = (RGB * scale - mean) / std (1/255)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean after scaling (0 0 0)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std after scaling (1 1 1)")
    p.add_argument(
        "--activation", choices=["softmax", "sigmoid"], default=None, help="what the outputs are (read from the graph)"
    )
    p.add_argument("--mode", choices=["tiled", "whole-slide"], default="tiled", help="tiles at --mpp, or one thumbnail")
    p.add_argument("--patch-size", type=int, nargs=2, metavar=("W", "H"), default=None, help="if the graph's is free")
    p.add_argument("--licence", default=None, help="the weights' licence (SPDX id, e.g. MIT)")
    p.add_argument("--slide", default=None, help="slide for the bundled test (default: the bundled CMU-1 region)")
    p.add_argument("--json", action="store_true", help="print the new entry as JSON")

    p = sub.add_parser(
        "qupath-project",
        help="create a QuPath project with slides and their predictions (needs paquo)",
        formatter_class=fmt,
    )
    p.add_argument("project", help="project folder to create")
    p.add_argument("results", nargs="+", help="results folders written by `zoo run`")
    return ap


def _class_map(items: list[tuple[str, str]]) -> dict[str, str]:
    return dict(items)


def cmd_list(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "kind": m.kind,
            "task": m.task,
            "stages": [name for name, _ in m.networks()],
            "default": m.name == reg.default_model,
            "licence": m.licence,
            "summary": m.summary,
            "warning": m.warning,
        }
        for m in reg.models
    ]
    if args.json:
        _print(rows, True)
    else:
        print(f"{'MODEL':<24} {'KIND':<21} {'TASK':<20} SUMMARY")
        for r in rows:
            kind = r["kind"] + (f" ({'+'.join(r['stages'])})" if len(r["stages"]) > 1 else "")
            print(f"{r['id']:<24} {kind:<21} {r['task']:<20} {'(default) ' if r['default'] else ''}{r['summary']}")
            if r["warning"]:
                print(f"{'':<24} WARNING: {r['warning']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    entry = reg.get(args.model)
    data = entry.model_dump(mode="json")
    data["versions"] = reg.versions(entry.name)
    data["weights"]["path"] = str(reg.resolve(entry.weights.uri))
    if args.json:
        _print(data, True)
        return 0
    print(model_card_text(entry, reg))
    return 0


def model_card_text(entry: Any, reg: Any) -> str:
    """A readable summary of a registry entry (``zoo info``)."""
    spec, out, w = entry.input, entry.output, entry.weights
    lines = [f"{entry.id}  ({entry.task}{', default model' if entry.name == reg.default_model else ''})"]
    lines.append(f"  {entry.summary}")
    if entry.warning:
        lines.append(f"  WARNING: {entry.warning}")
    lines.append(f"  versions: {', '.join(reg.versions(entry.name))}")
    lines.append("  classes:")
    lines += [f"    {c.index:>3}  {c.name:<16} colour {tuple(c.color)}" for c in entry.classes]
    if spec.mode == "tiled":
        lines.append(
            f"  input: {spec.patch_size_px[0]}x{spec.patch_size_px[1]} px tiles at {spec.target_mpp:g} µm/px, "
            f"{spec.overlap:.0%} overlap, {spec.channels} channels {spec.channel_order}, pixel x {spec.scale:.4g} "
            f"then (- mean {list(spec.mean)}) / std {list(spec.std)}"
        )
    else:
        lines.append(f"  input: the whole slide resized to {spec.patch_size_px[0]}x{spec.patch_size_px[1]} px")
    if spec.trained_mpp:
        lines.append(f"  trained at: {', '.join(f'{m:g}' for m in spec.trained_mpp)} µm/px")
    lines.append(f"  output: {out.channels} channel(s), {out.activation}, threshold {out.threshold:g}")
    files = [w.uri, *(f.path for f in w.files)]
    lines.append(f"  weights: {', '.join(files)} (sha256 {w.sha256[:12]}…, checked before every use)")
    lines.append(f"  licence: {entry.licence}")
    for key in ("trained_by", "source", "training_data", "labels"):
        if key in entry.provenance:
            lines.append(f"  {key.replace('_', ' ')}: {entry.provenance[key]}")
    for k, v in entry.metrics.items():
        if isinstance(v, (int, float)):
            lines.append(f"  {k.replace('_', ' ')}: {v:g}")
    if entry.card:
        lines.append(f"  model card: {reg.resolve(entry.card)}")
    lines.append("  machine-readable: zoo info --json " + entry.id)
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from zoo.registry import load_registry
    from zoo.verify import verify_model

    reg = load_registry(args.registry)
    entries = [reg.get(args.model)] if args.model else reg.models
    results = []
    for e in entries:
        try:
            results.append(verify_model(e, reg))
        except ZooError as err:
            results.append({"model": e.id, "ok": False, "error": str(err)})
    if args.json:
        _print(results, True)
    else:
        for r in results:
            state = "ok  " if r["ok"] else "FAIL"
            print(f"{state} {r['model']}: {r.get('detail') or r.get('error')}")
    return 0 if all(r["ok"] for r in results) else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from zoo.slide import open_slide, slide_base_mpp

    with open_slide(args.slide, backend=args.backend) as s:
        info = s.describe()
        mpp0, source = slide_base_mpp(s)
        info["resolution_used"] = {"mpp": mpp0, "source": source}
        _print(info, args.json)
    if source in ("assumed default", "objective power"):
        print(
            f"warning: {args.slide} has no resolution metadata; zoo will assume {mpp0:g} µm/px at level 0 "
            f"({source}); pass --slide-mpp to `zoo run` if that is wrong",
            file=sys.stderr,
        )
    return 0


class Console:
    """Where a run's messages go: result lines on stdout (not with --json or --quiet), warnings and
    errors on stderr, everything also to --log FILE."""

    def __init__(self, quiet: bool = False, as_json: bool = False, log: str | None = None) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.log = open(log, "a", encoding="utf-8") if log else None

    def _log(self, line: str) -> None:
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def info(self, line: str) -> None:
        self._log(line)
        if not (self.quiet or self.as_json):
            print(line, flush=True)

    def note(self, line: str) -> None:
        self._log(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        self._log(line)
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.log:
            self.log.close()


def cmd_run(args: argparse.Namespace, slides: list[str] | None = None) -> int:
    from zoo.engines.onnxruntime_engine import check_providers
    from zoo.jobs import (
        JobConfig,
        JobResult,
        check_writable,
        expand_slides,
        run_many,
        run_many_dask,
        summary_row,
        write_batch_summary,
    )
    from zoo.registry import load_registry, verified_model_files
    from zoo.runner import RunOptions

    reg = load_registry(args.registry)
    model = getattr(args, "model", None) or reg.default_model
    entry = reg.get(model)  # unknown model: fail before touching any slide
    paths = expand_slides(slides if slides is not None else args.slides)
    if not paths:
        print(f"error: no slides found in {args.slides}; pass slide files, a folder or a quoted glob", file=sys.stderr)
        return 1
    if args.providers:
        check_providers(args.providers)
    if args.device is not None and args.engine == "onnxruntime":
        check_providers(["CUDAExecutionProvider"])
    for _, view in entry.networks():  # a tampered or mismatched network, any stage, fails once, before any output
        verified_model_files(view, reg)
    from zoo.engines.select import gpu_engines
    from zoo.verify import select_engine

    gpu = gpu_engines(entry, args.engine, args.providers, args.device)
    if args.device is not None and not gpu:  # never a silent fall-back to the CPU
        raise ProviderError(
            f"--device {args.device}: no engine here runs {entry.id} on a GPU (onnxruntime has no CUDA provider, "
            "and torch sees no CUDA GPU or is not allowed by the entry); to get one: pip install '.[gpu]' "
            "(onnxruntime-gpu), or a CUDA build of torch with --engine torch"
        )
    select_engine(entry, reg, args.engine, args.precision, gpu=gpu)  # an impossible request fails here, once
    check_writable(args.out)  # before any inference
    try:
        con = Console(args.quiet, args.json, args.log)
    except OSError as err:
        raise OutputError(f"{args.log}: cannot write the log ({err.strerror}); choose another --log file") from err
    if entry.warning:
        con.warn(f"warning: {entry.id}: {entry.warning}")
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
    cfg = JobConfig(
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

    def report(k: int, r: JobResult) -> None:  # one line per slide, as it finishes
        where = f"[{k + 1}/{len(paths)}]"
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

    try:
        if args.workers or args.scheduler:
            results = run_many_dask(
                paths,
                cfg,
                scheduler=args.scheduler,
                workers=max(1, args.workers),
                on_result=report,
                on_message=con.note,
                progress=run.progress,
            )
        else:
            results = run_many(paths, cfg, on_result=report, on_message=con.note)
        # the batch summary, unless every slide failed (then the error lines are all there is to say)
        ran = any(r.status != "failed" for r in results)
        csv_path, html_path = write_batch_summary(args.out, results) if ran else (Path(), Path())
        if args.json:
            _emit_json([asdict(r) for r in results])
        if len(results) > 1:
            con.info(_table([summary_row(r) for r in results]))
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
    finally:
        con.close()


def _table(rows: list[dict[str, Any]]) -> str:
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


def cmd_show(args: argparse.Namespace) -> int:
    """Where a result's (or a batch's) pictures and tables are."""
    p = Path(args.result)
    if p.is_file() and p.name == "run.json":
        p = p.parent
    if (p / "run.json").is_file():
        info = json.loads((p / "run.json").read_text(encoding="utf-8"))
        out = {
            "picture": str(p / "overview.png") if (p / "overview.png").exists() else None,
            "slide": info.get("slide", {}).get("path"),
            "model": info.get("model", {}).get("id"),
            "classes": info.get("classes"),
            "files": sorted(x.name for x in p.iterdir() if not x.name.startswith(".")),
        }
    elif (p / "summary.html").is_file() or (p / "summary.csv").is_file():
        out = {
            "summary_html": str(p / "summary.html") if (p / "summary.html").exists() else None,
            "summary_csv": str(p / "summary.csv") if (p / "summary.csv").exists() else None,
            "results": sorted(str(x) for x in p.iterdir() if (x / "run.json").is_file()),
        }
    else:
        raise OutputError(f"{p}: not a result folder of `zoo run` (no run.json or summary); pass OUT/<slide> or OUT")
    if args.json:
        _print(out, True)
    else:
        for k, v in out.items():
            print(f"{k}: {json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from bridge.edits import corrected_mask
    from bridge.geojson import mask_to_feature_collection, read_qupath_geojson
    from zoo.outputs import guard_outputs, read_mask_tiff, write_json, write_mask_tiff
    from zoo.registry import load_registry

    src = Path(args.source)
    out_path = Path(args.out)
    inputs = [src] + ([Path(args.like)] if args.like else [])
    replaced = guard_outputs([out_path], inputs, args.force)
    if args.to == "geojson":
        mask, mpp, meta = read_mask_tiff(src)
        classes = _classes(meta, args, load_registry)
        ds = float(meta.get("downsample", 1.0))
        mpp0 = (mpp / ds) if mpp else args.slide_mpp
        fc = mask_to_feature_collection(
            mask, [c for c in classes if c.index != 0], ds, mpp0, args.simplify_um, args.min_area_um2, args.object_type
        )
        write_json(out_path, fc, overwrite=args.force)
        _say_replaced(replaced)
        print(f"{args.out}: {len(fc['features'])} features")
        return 0
    if not args.like:
        print(
            "error: --to tiff needs --like MASK.tiff or --like SLIDE (the size and resolution to rasterise onto)",
            file=sys.stderr,
        )
        return 2
    like_path = Path(args.like)
    if _is_label_tiff(like_path):
        like, mpp, meta = read_mask_tiff(like_path)
        classes = _classes(meta, args, load_registry)
        ds = float(meta.get("downsample", 1.0))
        shape = like.shape
    else:  # a slide that has not been run: a new mask at --mpp
        from zoo.slide import choose_level, model_dimensions, open_slide

        with open_slide(like_path) as slide:
            choice = choose_level(slide, target_mpp=args.mpp, slide_mpp=args.slide_mpp)
            w, h = model_dimensions(slide, choice)
        ds, mpp, shape = choice.downsample, choice.mpp, (h, w)
        meta = {"downsample": ds, "mpp": mpp, "slide": str(like_path), "slide_mpp_source": choice.mpp_source}
        classes = _classes({}, args, load_registry) if args.model else _classes_of_geojson(src)
        meta["classes"] = [{"index": c.index, "name": c.name, "color": list(c.color)} for c in classes]
    w0, h0 = round(shape[1] * ds), round(shape[0] * ds)
    report = read_qupath_geojson(src, bounds_px=(w0, h0))
    out = corrected_mask(report, classes, shape, ds, _class_map(args.class_map))
    if not report.annotations:
        raise GeoJSONError(
            f"{src}: none of its {report.total} feature(s) is usable ({'; '.join(report.rejected[:3])}); "
            "map its classes with --class-map NAME=CLASS"
        )
    write_mask_tiff(
        out_path,
        out,
        mpp,
        colormap={c.index: c.color for c in classes},
        description=json.dumps({**meta, "source": str(src)}),
        overwrite=args.force,
    )
    _say_replaced(replaced)
    print(json.dumps(report.summary()))
    return 0


def _say_replaced(paths: list[Path]) -> None:
    """With --force, say on stderr which existing files were replaced."""
    for p in paths:
        print(f"replaced {p} (--force)", file=sys.stderr)


def _edits_picture(
    dest: Path,
    model_mask: Any,
    edited: Any,
    given: Any,
    meta: dict[str, Any],
    mpp: float | None,
    overwrite: bool = True,
) -> Path:
    """``edits.png``: where the edit agrees with what the pathologist was given, and what they added or removed."""
    import numpy as np

    from zoo.pictures import render_overview, sample_mask
    from zoo.slide import open_slide, thumbnail

    base = given if given is not None else model_mask
    fg_base, fg_edit = base > 0, edited > 0
    labels = np.zeros(base.shape, np.uint8)
    labels[fg_base & fg_edit] = 1
    labels[fg_edit & ~fg_base] = 2
    labels[fg_base & ~fg_edit] = 3
    from bridge.geojson import ClassStyle

    classes = [
        ClassStyle(1, "Kept", (0, 160, 0)),
        ClassStyle(2, "Added by the pathologist", (0, 90, 255)),
        ClassStyle(3, "Removed by the pathologist", (230, 0, 0)),
    ]
    ds = float(meta.get("downsample", 1.0))
    thumb, thumb_ds = np.full((*base.shape, 3), 255, np.uint8), ds
    slide_path = meta.get("slide")
    if slide_path and Path(slide_path).exists():
        try:
            with open_slide(slide_path) as s:
                thumb, thumb_ds = thumbnail(s, max_side_px=1024)
        except ZooError:
            pass  # the slide moved or is unreadable: draw on white
    sampled = sample_mask(labels, thumb.shape[:2], thumb_ds / ds)
    px_um2 = (mpp or 0) ** 2
    areas = {
        c.name: {
            "area_mm2": round(float((labels == c.index).sum()) * px_um2 / 1e6, 4) if mpp else None,
            "fraction": float((labels == c.index).mean()),
        }
        for c in classes
    }
    caption = f"edits of {meta.get('model', '?')} · baseline: {'exported GeoJSON' if given is not None else 'mask'}"
    return render_overview(
        dest, thumb, sampled, classes, mpp / ds * thumb_ds if mpp else None, caption, areas, overwrite
    )


def _is_label_tiff(path: Path) -> bool:
    """True for a single-channel TIFF (a label mask), False for anything else (a slide)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.pages.first.samplesperpixel) == 1 and path.suffix.lower() in (".tif", ".tiff")
    except (OSError, tifffile.TiffFileError, ValueError, IndexError):
        return False


def _classes_of_geojson(path: Path) -> list[Any]:
    """Background plus each class named in a GeoJSON file, in order of first appearance, with its colour."""
    from bridge.geojson import ClassStyle, read_qupath_geojson

    seen: dict[str, tuple[int, int, int]] = {}
    for a in read_qupath_geojson(path).annotations:
        if a.class_name and a.class_name not in seen:
            seen[a.class_name] = a.color or (255, 0, 0)
    if len(seen) > 254:
        raise GeoJSONError(f"{path}: {len(seen)} classes; a label mask holds at most 254: merge them with --class-map")
    return [ClassStyle(0, "Background", (255, 255, 255))] + [
        ClassStyle(k + 1, name, color) for k, (name, color) in enumerate(seen.items())
    ]


def _classes(meta: dict[str, Any], args: argparse.Namespace, load_registry: Any) -> list[Any]:
    """A mask's classes (from its metadata, else from --model or the model it names), QuPath names included."""
    from bridge.geojson import ClassStyle

    if meta.get("classes") and not args.model:
        return _with_qupath_names([ClassStyle.from_meta(c) for c in meta["classes"]], meta, args, load_registry)
    entry = load_registry(args.registry).get(args.model or meta.get("model"))
    return [ClassStyle(c.index, c.name, tuple(c.color), c.qupath_name) for c in entry.classes]


def _with_qupath_names(
    classes: list[Any], meta: dict[str, Any], args: argparse.Namespace, load_registry: Any
) -> list[Any]:
    """Masks written before their metadata carried ``qupath_name``: take it from the registered model, if any."""
    import dataclasses

    if any(c.qupath_name for c in classes) or not meta.get("model"):
        return classes
    try:
        entry = load_registry(getattr(args, "registry", None)).get(str(meta["model"]))
    except ZooError:
        return classes
    names = {c.index: c.qupath_name for c in entry.classes if c.qupath_name}
    return [dataclasses.replace(c, qupath_name=names.get(c.index)) for c in classes]


def cmd_edits(args: argparse.Namespace) -> int:
    from bridge.edits import corrected_mask, edit_report
    from bridge.geojson import ClassStyle, read_qupath_geojson
    from zoo.outputs import guard_outputs, read_mask_tiff, write_mask_tiff
    from zoo.registry import load_registry

    pred_path = Path(args.prediction)
    if pred_path.is_dir():
        pred_path = pred_path / "mask.tiff"
    out = Path(args.out) if args.out else pred_path.with_name("corrected.tiff")
    picture = out.with_name("edits.png")
    baseline_path = Path(args.baseline) if args.baseline else pred_path.with_name("annotations.geojson")
    inputs = [pred_path, Path(args.edited), baseline_path]
    replaced = guard_outputs([out, picture], inputs, args.force)
    pred, mpp, meta = read_mask_tiff(pred_path)
    if not meta.get("classes"):
        print(f"error: {pred_path}: has no class metadata; pass a mask written by `zoo run`", file=sys.stderr)
        return 1
    classes = _with_qupath_names([ClassStyle.from_meta(c) for c in meta["classes"]], meta, args, load_registry)
    ds = float(meta.get("downsample", 1.0))
    w0, h0 = round(pred.shape[1] * ds), round(pred.shape[0] * ds)
    aliases = _class_map(args.class_map)
    report = read_qupath_geojson(args.edited, bounds_px=(w0, h0))
    fixed = corrected_mask(report, classes, pred.shape, ds, aliases)
    if not report.annotations:
        raise GeoJSONError(
            f"{args.edited}: none of its {report.total} feature(s) is usable ({'; '.join(report.rejected[:3])}); "
            "map its classes with --class-map NAME=CLASS or export the edited objects again"
        )
    given = None
    if baseline_path.is_file():
        base = read_qupath_geojson(baseline_path, bounds_px=(w0, h0))
        given = corrected_mask(base, classes, pred.shape, ds, aliases)
    elif args.baseline:
        raise GeoJSONError(f"{baseline_path}: no such file; pass the GeoJSON the pathologist was given")
    result = edit_report(pred, fixed, classes, (mpp * mpp) if mpp else None, given)
    result["baseline_file"] = str(baseline_path) if given is not None else None
    write_mask_tiff(
        out,
        fixed,
        mpp,
        colormap={c.index: c.color for c in classes},
        description=json.dumps({**meta, "edited": str(args.edited)}),
        overwrite=args.force,
    )
    result.update({"import": report.summary(), "corrected_mask": str(out)})
    try:
        result["picture"] = str(_edits_picture(picture, pred, fixed, given, meta, mpp, overwrite=args.force))
    except BaseException:
        out.unlink(missing_ok=True)  # this run's own mask: no half result (the picture failed)
        raise
    result["replaced"] = [str(p) for p in replaced]
    _say_replaced(replaced)
    if args.json:
        _print(result, True)
    else:
        unit = result["changes"]["area_unit"]
        print(f"baseline: {result['baseline']}" + (f" ({baseline_path})" if given is not None else ""))
        for name, c in result["changes"]["classes"].items():
            m = result["vs_model_mask"]["classes"][name]
            print(
                f"{name}: added {c[f'added_{unit}']:g} {unit}, removed {c[f'removed_{unit}']:g} {unit}, "
                f"Dice {c['dice']:.4f} (against the model's mask: Dice {m['dice']:.4f})"
            )
        imp = result["import"]
        print(f"import: {imp['features']} features, {imp['kept']} kept, {imp['rejected']} rejected")
        print(f"corrected mask: {out}")
        print(f"picture: {result['picture']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bridge.fpl import export_fast_folder, repo_pipeline_files
    from zoo.registry import load_registry

    reg = load_registry(args.registry)
    if args.target == "pipelines":
        folder = Path(args.dir) if args.dir else reg.root / "pipelines"
        folder.mkdir(parents=True, exist_ok=True)
        for entry in reg.models:
            try:
                files = repo_pipeline_files(entry, versioned=entry.version != reg.versions(entry.name)[-1])
            except FplError as err:  # FAST cannot run it: say why, keep going
                print(f"skipped {entry.id}: {err}", file=sys.stderr)
                continue
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")
                print(folder / name)
        return 0
    if args.target == "wsinfer":
        from bridge.wsinfer import export_wsinfer

        print(export_wsinfer(reg.get(args.model), reg, Path(args.out), force=args.force))
        return 0
    if args.target == "bioimageio":
        from bridge.bioimageio import export_bioimageio

        print(export_bioimageio(reg.get(args.model), reg, Path(args.out), force=args.force))
        return 0
    written = export_fast_folder(reg.get(args.model), reg, Path(args.dir), engine=args.engine, force=args.force)
    for p in written:
        print(p)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from bridge.register import Request, register_any
    from zoo.errors import RegisterError

    if not getattr(args, "registry", None):
        raise RegisterError("pass --registry my-models.yaml: the user registry to add the model to (made if missing)")
    req = Request(
        name=args.name,
        version=args.version,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        mpp=args.mpp,
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        activation=args.activation,
        mode=args.mode,
        patch_size_px=tuple(args.patch_size) if args.patch_size else None,
        licence=args.licence,
    )
    entry = register_any(Path(args.source), req, Path(args.registry), Path(args.slide) if args.slide else None)
    if args.json:
        _emit_json(entry.model_dump(mode="json"))
    else:
        print(f"registered {entry.id} in {args.registry}")
        print(f"run it with: zoo --registry {args.registry} run {entry.name} SLIDE")
    return 0


def cmd_qupath_project(args: argparse.Namespace) -> int:
    from bridge.qupath_project import create_project

    path = create_project(Path(args.project), [Path(r) for r in args.results])
    print(path)
    return 0


#: Where JSON for machines goes when --json is given (the real stdout; see _json_stdout).
_JSON_OUT: list[Any] = []


def _emit_json(obj: Any) -> None:
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    out.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.flush()


@contextlib.contextmanager
def _json_stdout(enabled: bool) -> Iterator[None]:
    """With --json, everything else that writes to stdout (libraries' C code included) goes to stderr."""
    if not enabled:
        yield
        return
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (OSError, ValueError, AttributeError):  # replaced stdout (tests, notebooks): Python-level only
        on_fd1 = False
    if not on_fd1:
        _JSON_OUT.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _JSON_OUT.pop()
        return
    sys.stdout.flush()
    saved = os.dup(1)
    real = os.fdopen(saved, "w", encoding="utf-8", closefd=True)
    os.dup2(2, 1)
    _JSON_OUT.append(real)
    try:
        yield
    finally:
        _JSON_OUT.pop()
        sys.stdout.flush()
        os.dup2(saved, 1)
        real.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        args.model = None
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "list": cmd_list,
        "info": cmd_info,
        "verify": cmd_verify,
        "inspect": cmd_inspect,
        "run": cmd_run,
        "demo": lambda a: cmd_run(a, slides=[str(bundled_slide())]),
        "convert": cmd_convert,
        "edits": cmd_edits,
        "export": cmd_export,
        "register": cmd_register,
        "qupath-project": cmd_qupath_project,
        "show": cmd_show,
    }
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stop_signals}
    forget_signals()
    with contextlib.suppress(ValueError):  # not in the main thread (tests): keep the defaults
        for s in stop_signals:
            signal.signal(s, on_stop_signal)
    try:
        with _json_stdout(getattr(args, "json", False)):
            return commands[args.cmd](args)
    except ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial results were removed; run the same command again to finish", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: partial results were removed; run the same command again to finish", file=sys.stderr)
        return 143
    finally:
        with contextlib.suppress(ValueError):
            for s, handler in previous.items():
                if handler is not None:
                    signal.signal(s, handler)


if __name__ == "__main__":
    raise SystemExit(main())

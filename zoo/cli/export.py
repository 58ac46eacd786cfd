"""``zoo export`` (FastPathology, WSInfer, bioimage.io, the kept FAST pipelines) and ``zoo qupath-project``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zoo.errors import FplError


def add_export(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo export`` command's options."""
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


def add_qupath_project(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo qupath-project`` command's options."""
    p = sub.add_parser(
        "qupath-project",
        help="create a QuPath project with slides and their predictions (needs paquo)",
        formatter_class=fmt,
    )
    p.add_argument("project", help="project folder to create")
    p.add_argument("results", nargs="+", help="results folders written by `zoo run`")


def cmd_qupath_project(args: argparse.Namespace) -> int:
    from bridge.qupath_project import create_project

    path = create_project(Path(args.project), [Path(r) for r in args.results])
    print(path)
    return 0

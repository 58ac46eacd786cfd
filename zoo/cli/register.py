"""``zoo register``: your own model (.onnx, bioimage.io package, WSInfer folder) into a user registry, verified."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zoo.cli.common import emit_json


def add_register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo register`` command's options."""
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
        emit_json(entry.model_dump(mode="json"))
    else:
        print(f"registered {entry.id} in {args.registry}")
        print(f"run it with: zoo --registry {args.registry} run {entry.name} SLIDE")
    return 0

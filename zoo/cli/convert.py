"""``zoo convert`` and ``zoo edits``: masks to QuPath GeoJSON and back; a pathologist's edits as a corrected mask."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zoo.cli.common import class_map, class_mapping, nonneg_float, positive_float, print_result, say_replaced
from zoo.errors import GeoJSONError, ZooError


def add_convert(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo convert`` command's options."""
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
        say_replaced(replaced)
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
    out = corrected_mask(report, classes, shape, ds, class_map(args.class_map))
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
    say_replaced(replaced)
    print(json.dumps(report.summary()))
    return 0


def add_edits(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo edits`` command's options."""
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
    aliases = class_map(args.class_map)
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
    say_replaced(replaced)
    if args.json:
        print_result(result, True)
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

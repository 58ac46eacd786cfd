"""Masks to QuPath GeoJSON and back (numpy, rasterio, shapely, geojson).

Conventions QuPath uses, followed here:

* coordinates are (x, y) in level-0 pixels of the slide;
* one ``Feature`` per object with ``properties.objectType`` (``annotation`` or
  ``detection``), ``properties.classification`` = ``{"name", "color": [r, g, b]}``,
  ``isLocked`` and ``measurements`` (a name -> number mapping);
* Polygon (exterior plus holes) or MultiPolygon geometries.

Reading accepts every export style in use: 0.3+ FeatureCollections and single
Features, and 0.2's bare JSON arrays with ``"id": "PathAnnotationObject"`` and
``classification.colorRGB`` (a packed signed ARGB integer).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import geojson
import numpy as np
import shapely
from affine import Affine
from rasterio import features as rfeatures
from shapely.geometry import MultiPolygon, Polygon, box, mapping, shape

from zoo.errors import GeoJSONError
from zoo.labelmask import RowSource, as_rows

ObjectType = Literal["annotation", "detection"]


@dataclass(frozen=True)
class ClassStyle:
    """A class as QuPath shows it: label value in masks, name and RGB colour."""

    index: int
    name: str
    color: tuple[int, int, int]


def mask_to_polygons(
    mask: np.ndarray | RowSource,
    downsample: float = 1.0,
    simplify_px: float = 0.0,
    min_area_px: float = 0.0,
    value: int | None = None,
    values: Iterable[int] | None = None,
    band_bytes: int = 16 << 20,
) -> dict[int, list[Polygon]]:
    """Vectorise a label mask into valid polygons with holes, per label value.

    The mask is read in bands of rows (about ``band_bytes`` each), so memory follows the
    band and the objects, not the mask. Each band is traced with 4-connectivity (pixels
    touching only at a corner are separate objects, as in QuPath), which gives simple
    polygons; only pieces that touch a band seam are merged with their neighbours across
    it. Cost is linear in pixels and objects.

    Args:
        mask: (height, width) integer labels (array or :class:`zoo.labelmask.LabelMask`); 0 is background.
        downsample: level-0 pixels per mask pixel (output coordinates are level-0 pixels).
        simplify_px: Douglas-Peucker tolerance in level-0 pixels (0: none); topology kept.
        min_area_px: drop polygons smaller than this area in level-0 pixels².
        value: vectorise only this label.
        values: vectorise only these labels (default: every non-zero label).

    Returns:
        label value -> list of valid Polygons (never self-intersecting; slivers dropped).
    """
    src = as_rows(mask)
    h, w = src.shape
    wanted = np.array(sorted({value} if value is not None else set(values or range(1, 256))), np.int64)
    rows = max(1, band_bytes // max(1, w))
    done: dict[int, list[Polygon]] = {}
    seam: dict[int, list[Polygon]] = {}
    min_area = max(min_area_px, 0.0)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = src.read_rows(y0, y1)
        sel = np.isin(band, wanted)
        if not sel.any():
            continue
        if band.dtype != np.uint8:
            band = band.astype(np.int32)
        transform = Affine.scale(downsample) @ Affine.translation(0, y0)
        top, bottom = y0 * downsample, y1 * downsample
        for geom, val in rfeatures.shapes(band, mask=sel, connectivity=4, transform=transform):
            poly = shape(geom)
            _, miny, _, maxy = poly.bounds
            at_seam = (y0 > 0 and miny <= top) or (y1 < h and maxy >= bottom)
            if at_seam:
                seam.setdefault(int(val), []).append(poly)
            elif poly.area > min_area:
                done.setdefault(int(val), []).append(poly)
    for val, pieces in seam.items():
        done.setdefault(val, []).extend(p for p in _polygons_of(shapely.union_all(pieces)) if p.area > min_area)
    out: dict[int, list[Polygon]] = {}
    for val, polys in done.items():
        arr = np.array(polys, dtype=object)
        bad = ~shapely.is_valid(arr)
        if bad.any():  # a ring pinched at a corner: split into valid parts
            arr = np.array(
                [p for p, b in zip(polys, bad) for p in (_polygons_of(shapely.make_valid(p)) if b else [p])],
                dtype=object,
            )
        if simplify_px > 0:
            arr = shapely.simplify(arr, simplify_px, preserve_topology=True)
            bad = ~shapely.is_valid(arr)
            if bad.any():
                arr = np.array(
                    [p for p, b in zip(arr, bad) for p in (_polygons_of(shapely.make_valid(p)) if b else [p])],
                    dtype=object,
                )
        keep = [p for p in arr if isinstance(p, Polygon) and not p.is_empty and p.area > min_area]
        if keep:
            out[val] = keep
    return dict(sorted(out.items()))


def _polygons_of(geom: Any) -> list[Polygon]:
    """Polygons inside any geometry (GeometryCollections from make_valid included)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def qupath_feature(
    geom: Polygon | MultiPolygon,
    cls: ClassStyle,
    object_type: ObjectType = "annotation",
    mpp: float | None = None,
    locked: bool = False,
    extra_measurements: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One QuPath Feature; measurements include area (µm² when ``mpp`` is known, else px²)."""
    meas: dict[str, float] = {}
    if mpp:
        meas["Area µm^2"] = round(geom.area * mpp * mpp, 3)
        meas["Perimeter µm"] = round(geom.length * mpp, 3)
    else:
        meas["Area px^2"] = round(geom.area, 3)
    meas.update(extra_measurements or {})
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": _round_geometry(mapping(geom)),
        "properties": {
            "objectType": object_type,
            "classification": {"name": cls.name, "color": list(cls.color)},
            "isLocked": locked,
            "measurements": meas,
        },
    }


def _round_geometry(g: Mapping[str, Any], ndigits: int = 2) -> dict[str, Any]:
    def rnd(c: Any) -> Any:
        if isinstance(c, (int, float)):
            v = round(float(c), ndigits)
            return int(v) if v.is_integer() else v
        return [rnd(x) for x in c]

    return {"type": g["type"], "coordinates": rnd(g["coordinates"])}


def mask_to_feature_collection(
    mask: np.ndarray | RowSource,
    classes: Sequence[ClassStyle],
    downsample: float = 1.0,
    mpp0: float | None = None,
    simplify_um: float = 0.0,
    min_area_um2: float = 0.0,
    object_type: ObjectType = "annotation",
    merge: bool = False,
) -> dict[str, Any]:
    """A QuPath FeatureCollection from a label mask.

    Args:
        mask: (height, width) class indices at ``downsample``.
        classes: styles of the non-zero labels (others are ignored).
        downsample: level-0 pixels per mask pixel.
        mpp0: level-0 µm/px, for µm tolerances and areas (without it, tolerances are level-0 px).
        simplify_um: simplification tolerance in µm.
        min_area_um2: objects smaller than this are dropped.
        object_type: ``annotation`` (editable regions) or ``detection`` (many small objects).
        merge: one MultiPolygon feature per class instead of one feature per connected object.
    """
    px_per_um = 1.0 / mpp0 if mpp0 else 1.0
    by_index = {c.index: c for c in classes}
    polys = mask_to_polygons(
        mask,
        downsample,
        simplify_px=simplify_um * px_per_um,
        min_area_px=min_area_um2 * px_per_um**2,
        values=by_index,
    )
    feats: list[dict[str, Any]] = []
    for val in sorted(polys):
        cls = by_index.get(val)
        if cls is None:
            continue
        if merge:
            feats.append(qupath_feature(MultiPolygon(polys[val]), cls, object_type, mpp0))
        else:
            feats.extend(qupath_feature(p, cls, object_type, mpp0) for p in polys[val])
    fc = {"type": "FeatureCollection", "features": feats}
    errors = geojson.FeatureCollection(**fc).errors()  # type: ignore[no-untyped-call]
    if errors:
        raise GeoJSONError(f"internal error: generated GeoJSON is invalid ({errors})")
    return fc


# --------------------------------------------------------------------------- reading


def argb_to_rgb(value: int) -> tuple[int, int, int]:
    """QuPath 0.2's packed signed ARGB integer (``colorRGB``) to (r, g, b)."""
    v = value & 0xFFFFFFFF
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


@dataclass
class Annotation:
    """One imported object: a valid (Multi)Polygon in level-0 pixels and its class."""

    geometry: Polygon | MultiPolygon
    class_name: str | None
    color: tuple[int, int, int] | None
    object_type: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportReport:
    """What an import kept and what it rejected, with reasons."""

    source: str
    annotations: list[Annotation] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    repaired: int = 0
    clipped: int = 0

    def summary(self) -> dict[str, Any]:
        classes: dict[str, int] = {}
        for a in self.annotations:
            classes[a.class_name or "Unclassified"] = classes.get(a.class_name or "Unclassified", 0) + 1
        return {
            "source": self.source,
            "kept": len(self.annotations),
            "rejected": len(self.rejected),
            "repaired": self.repaired,
            "clipped": self.clipped,
            "classes": classes,
            "reject_reasons": self.rejected[:20],
        }


def _features_of(doc: Any, source: str) -> list[Any]:
    if isinstance(doc, list):  # QuPath 0.2: a bare array of features
        return doc
    if isinstance(doc, dict):
        t = doc.get("type")
        if t == "FeatureCollection":
            return list(doc.get("features") or [])
        if t == "Feature":
            return [doc]
        if t in (
            "Polygon",
            "MultiPolygon",
            "GeometryCollection",
            "Point",
            "LineString",
            "MultiPoint",
            "MultiLineString",
        ):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise GeoJSONError(
        f"{source}: not GeoJSON annotations (expected a FeatureCollection, a Feature or a QuPath 0.2 array); "
        "export with QuPath's File > Export objects as GeoJSON"
    )


def parse_qupath_geojson(doc: Any, source: str = "<geojson>", bounds_px: tuple[int, int] | None = None) -> ImportReport:
    """Read annotations from any QuPath GeoJSON export style.

    Invalid polygons are repaired (``make_valid``); features with non-areal geometry,
    or wholly outside ``bounds_px`` (level-0 width, height), are rejected with a reason;
    partly outside ones are clipped. Nothing valid is dropped.
    """
    report = ImportReport(source)
    frame = box(0, 0, bounds_px[0], bounds_px[1]) if bounds_px else None
    for k, feat in enumerate(_features_of(doc, source)):
        fid = feat.get("id", k) if isinstance(feat, dict) else k
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            report.rejected.append(f"feature {fid}: no geometry")
            continue
        try:
            geom = shape(feat["geometry"])
        except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as err:
            report.rejected.append(f"feature {fid}: unreadable geometry ({err})")
            continue
        if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            report.rejected.append(f"feature {fid}: {geom.geom_type} has no area (only Polygon/MultiPolygon)")
            continue
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            report.rejected.append(f"feature {fid}: a coordinate is NaN or infinite")
            continue
        try:
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
                report.repaired += 1
        except shapely.errors.GEOSException as err:
            report.rejected.append(f"feature {fid}: geometry cannot be repaired ({err})")
            continue
        polys = _polygons_of(geom)
        if not polys:
            report.rejected.append(f"feature {fid}: no area after repair")
            continue
        geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
        if frame is not None and not frame.contains(geom):
            clipped = _polygons_of(geom.intersection(frame))
            if not clipped:
                report.rejected.append(f"feature {fid}: lies outside the slide (0..{bounds_px[0]}, 0..{bounds_px[1]})")  # type: ignore[index]
                continue
            geom = clipped[0] if len(clipped) == 1 else MultiPolygon(clipped)
            report.clipped += 1
        props = feat.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else None
        color: tuple[int, int, int] | None = None
        if isinstance(cls, dict) and isinstance(cls.get("color"), list) and len(cls["color"]) >= 3:
            color = tuple(int(c) for c in cls["color"][:3])  # type: ignore[assignment]
        elif isinstance(cls, dict) and isinstance(cls.get("colorRGB"), int):
            color = argb_to_rgb(cls["colorRGB"])
        obj = props.get("objectType") or "annotation"  # 0.2 exports: "id": "PathAnnotationObject"
        if feat.get("id") == "PathDetectionObject":
            obj = "detection"
        report.annotations.append(Annotation(geom, name, color, str(obj), dict(props)))
    return report


def read_qupath_geojson(path: str | Path, bounds_px: tuple[int, int] | None = None) -> ImportReport:
    """Read a QuPath GeoJSON file (see :func:`parse_qupath_geojson`).

    Raises:
        GeoJSONError: the file is missing or not JSON.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise GeoJSONError(f"{p}: no such file; check the path") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GeoJSONError(f"{p}: not valid JSON ({err}); re-export it from QuPath") from err
    return parse_qupath_geojson(doc, str(p), bounds_px)


def rasterize_annotations(
    annotations: Iterable[Annotation],
    class_map: Mapping[str, int],
    shape_px: tuple[int, int],
    downsample: float = 1.0,
    unknown: Literal["reject", "ignore"] = "reject",
    report: ImportReport | None = None,
) -> np.ndarray:
    """Burn annotations into a (height, width) uint8 label mask at ``downsample``.

    ``class_map`` maps class names to label values (matching is case-insensitive);
    annotations of other classes are skipped and counted in ``report.rejected``.
    Later annotations are drawn over earlier ones.
    """
    lower = {k.lower(): v for k, v in class_map.items()}
    shapes: list[tuple[Any, int]] = []
    for a in annotations:
        val = lower.get((a.class_name or "").lower())
        if val is None:
            if report is not None and unknown == "reject":
                report.rejected.append(
                    f"class {a.class_name!r} is not one of {sorted(class_map)}; map it with --class-map NAME=CLASS"
                )
            continue
        shapes.append((mapping(a.geometry), int(val)))
    h, w = shape_px
    if not shapes:
        return np.zeros((h, w), np.uint8)
    return rfeatures.rasterize(
        shapes, out_shape=(h, w), transform=Affine.scale(downsample), fill=0, dtype="uint8", all_touched=False
    )

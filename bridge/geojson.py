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

import fnmatch
import hashlib
import json
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

#: The name QuPath's objects without a classification go by, in reports and in ``--class-map``.
UNCLASSIFIED = "Unclassified"


@dataclass(frozen=True)
class ClassStyle:
    """A class as QuPath shows it: label value in masks, name and RGB colour.

    ``qupath_name``: the classification QuPath knows it by when not ``name`` (e.g. ``Ignore*``); on
    import it maps back to this class.
    """

    index: int
    name: str
    color: tuple[int, int, int]
    qupath_name: str | None = None

    @staticmethod
    def from_meta(c: Mapping[str, Any]) -> ClassStyle:
        """From a mask's metadata (``{"index", "name", "color", "qupath_name"?}``)."""
        q = c.get("qupath_name")
        return ClassStyle(int(c["index"]), str(c["name"]), tuple(int(v) for v in c["color"])[:3], q or None)  # type: ignore[arg-type]


#: coordinates are written rounded to this grid (level-0 px): 0.01 px, as QuPath 0.6+ snap-rounds
WRITTEN_GRID_PX = 0.01


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
    wanted_lut = np.zeros(256, bool)  # uint8 masks: a table lookup (np.isin sorts the band against 255 values)
    wanted_lut[wanted[(wanted >= 0) & (wanted < 256)]] = True
    done: dict[int, list[Polygon]] = {}
    seam: dict[int, list[Polygon]] = {}
    min_area = max(min_area_px, 0.0)
    min_pixels = min_area / (downsample * downsample)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = src.read_rows(y0, y1)
        sel = wanted_lut[band] if band.dtype == np.uint8 else np.isin(band, wanted)
        if not sel.any():
            continue
        if min_pixels >= 1:
            sel &= ~_small_objects(band, sel, min_pixels, touch_top=y0 > 0, touch_bottom=y1 < h)
        if band.dtype != np.uint8:
            band = band.astype(np.int32)
        transform = Affine.scale(downsample) @ Affine.translation(0, y0)
        top, bottom = y0 * downsample, y1 * downsample
        polys, vals = _trace(band, sel, transform)
        if not len(polys):
            continue
        bounds = shapely.bounds(polys)
        at_seam = ((y0 > 0) & (bounds[:, 1] <= top)) | ((y1 < h) & (bounds[:, 3] >= bottom))
        big = shapely.area(polys) > min_area
        for v in np.unique(vals):
            of_v = vals == v
            seam.setdefault(int(v), []).extend(polys[of_v & at_seam])
            done.setdefault(int(v), []).extend(polys[of_v & ~at_seam & big])
    for val, pieces in seam.items():
        done.setdefault(val, []).extend(p for p in _polygons_of(shapely.union_all(pieces)) if p.area > min_area)
    out: dict[int, list[Polygon]] = {}
    for val, found in done.items():
        arr = np.array(found, dtype=object)
        bad = ~shapely.is_valid(arr)
        if bad.any():  # a ring pinched at a corner: split into valid parts
            arr = np.array(
                [p for p, b in zip(found, bad) for p in (_polygons_of(shapely.make_valid(p)) if b else [p])],
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
        # snap to the 0.01 px grid the file is written at (as QuPath 0.6+ does on import): rounding a valid
        # ring can make it cross itself; set_precision's output is valid at that precision
        arr = shapely.set_precision(arr, WRITTEN_GRID_PX)
        keep = [q for p in arr for q in _polygons_of(p) if q.is_valid and q.area > min_area]
        if keep:
            out[val] = keep
    return dict(sorted(out.items()))


def _trace(band: np.ndarray, sel: np.ndarray, transform: Affine) -> tuple[np.ndarray, np.ndarray]:
    """4-connected regions of ``band`` under ``sel`` as an array of Polygons and their label values.

    rasterio (GDAL's polygonize) traces the rings; the polygons are built in one vectorised
    call for the common case of no holes.
    """
    shells: list[Any] = []
    shell_vals: list[int] = []
    holed: list[Polygon] = []
    holed_vals: list[int] = []
    for geom, val in rfeatures.shapes(band, mask=sel, connectivity=4, transform=transform):
        rings = geom["coordinates"]
        if len(rings) == 1:
            shells.append(rings[0])
            shell_vals.append(int(val))
        else:
            holed.append(Polygon(rings[0], rings[1:]))
            holed_vals.append(int(val))
    parts = []
    if shells:
        lengths = np.fromiter((len(r) for r in shells), np.int64, len(shells))
        coords = np.fromiter((c for r in shells for pt in r for c in pt), np.float64, int(lengths.sum()) * 2).reshape(
            -1, 2
        )
        rings_arr = shapely.linearrings(coords, indices=np.repeat(np.arange(len(shells)), lengths))
        parts.append(shapely.polygons(rings_arr))
    if holed:
        parts.append(np.array(holed, dtype=object))
    polys = np.concatenate(parts) if parts else np.array([], dtype=object)
    return polys, np.array(shell_vals + holed_vals, np.int64)


def _small_objects(
    band: np.ndarray, sel: np.ndarray, min_pixels: float, touch_top: bool, touch_bottom: bool
) -> np.ndarray:
    """Pixels of 4-connected same-label objects smaller than ``min_pixels`` that no band seam cuts.

    A pixel polygon's area is its pixel count, so these are exactly the objects the area filter
    would drop later; dropping them before tracing saves the cost of building them (noisy masks).
    """
    from scipy import ndimage as ndi

    small = np.zeros_like(sel)
    four = ndi.generate_binary_structure(2, 1)
    for val in np.unique(band[sel]):
        lab, n = ndi.label(sel & (band == val), structure=four)
        if n == 0:
            continue
        sizes = ndi.histogram(lab, 0, n, n + 1)  # bincount would first copy the int32 labels to int64
        drop = sizes < min_pixels
        drop[0] = False
        for edge, cut in ((lab[0], touch_top), (lab[-1], touch_bottom)):
            if cut:
                drop[np.unique(edge)] = False  # may continue in the next band: decide after merging
        small |= drop[lab]
    return small


def object_means(
    polys: Sequence[Polygon], values: np.ndarray | RowSource, downsample: float = 1.0, band_bytes: int = 16 << 20
) -> np.ndarray:
    """Mean of ``values`` (a raster at ``downsample``) over the pixels inside each polygon.

    Pixels are those whose centres lie inside (as the polygons are rasterised back), so for
    polygons traced from a mask the mean is over exactly the object's pixels. One pass over
    the raster in bands; each band rasterises only the polygons that reach it.
    """
    src = as_rows(values)
    h, w = src.shape
    n = len(polys)
    sums, counts = np.zeros(n + 1), np.zeros(n + 1)
    if n == 0:
        return np.zeros(0)
    tree = shapely.STRtree(list(polys))
    rows = max(1, band_bytes // max(1, 4 * w))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        hits = tree.query(box(0, y0 * downsample, w * downsample, y1 * downsample))
        if len(hits) == 0:
            continue
        transform = Affine.scale(downsample) @ Affine.translation(0, y0)
        labels = rfeatures.rasterize(
            [(mapping(polys[i]), int(i) + 1) for i in hits], out_shape=(y1 - y0, w), transform=transform, dtype="int32"
        )
        band = src.read_rows(y0, y1).astype(np.float64)
        sums += np.bincount(labels.ravel(), weights=band.ravel(), minlength=n + 1)
        counts += np.bincount(labels.ravel(), minlength=n + 1)
    return (sums / np.maximum(counts, 1))[1:]


def _polygons_of(geom: Any) -> list[Polygon]:
    """Polygons inside any geometry (GeometryCollections from make_valid included)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def _features_fast(
    polys: Sequence[Polygon],
    cls: ClassStyle,
    object_type: ObjectType,
    mpp: float | None,
    extra: Sequence[Mapping[str, float] | None],
) -> list[dict[str, Any]]:
    """:func:`qupath_feature` for many Polygons at once (vectorised coordinates, areas and ids)."""
    arr = np.array(list(polys), dtype=object)
    areas, lengths = shapely.area(arr), shapely.length(arr)
    _, coords, (ring_off, geom_off) = shapely.to_ragged_array(arr)
    coords = np.round(coords, 2)
    exact = bool(np.all(coords == np.rint(coords)))
    as_list = (coords.astype(np.int64) if exact else coords).tolist()
    color = list(cls.color)
    feats = []
    for i in range(len(arr)):
        r0, r1 = int(geom_off[i]), int(geom_off[i + 1])
        rings = [as_list[int(ring_off[r]) : int(ring_off[r + 1])] for r in range(r0, r1)]
        c0, c1 = int(ring_off[r0]), int(ring_off[r1])
        digest = hashlib.sha256(
            cls.name.encode() + coords[c0:c1].tobytes() + np.asarray(ring_off[r0 : r1 + 1]).tobytes()
        ).digest()
        meas: dict[str, float] = (
            {"Area µm^2": round(float(areas[i]) * mpp * mpp, 3), "Perimeter µm": round(float(lengths[i]) * mpp, 3)}
            if mpp
            else {"Area px^2": round(float(areas[i]), 3)}
        )
        meas.update(extra[i] or {})
        feats.append(
            {
                "type": "Feature",
                "id": _uuid_from(digest),
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": object_type,
                    "classification": {"name": cls.name, "color": color},
                    "isLocked": False,
                    "measurements": meas,
                },
            }
        )
    return feats


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
    geometry = _round_geometry(mapping(geom))
    return {
        "type": "Feature",
        "id": object_id(cls.name, geometry),
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": cls.name, "color": list(cls.color)},
            "isLocked": locked,
            "measurements": meas,
        },
    }


def object_id(class_name: str, geometry: Mapping[str, Any]) -> str:
    """A UUID (as QuPath expects) that depends only on the class and the geometry: reruns give the same ids."""
    return _uuid_from(hashlib.sha256(json.dumps([class_name, geometry], separators=(",", ":")).encode()).digest())


def _uuid_from(digest: bytes) -> str:
    """An RFC 9562 version-8 (custom) UUID string from the first 16 bytes of a hash digest."""
    b = bytearray(digest[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
    probabilities: Mapping[int, np.ndarray | RowSource] | None = None,
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
        probabilities: class index -> uint8 raster of that class's probability x 255 at ``downsample``;
            each object then gets a ``Mean class probability`` measurement (0-1).
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
        geoms: list[Polygon | MultiPolygon] = [MultiPolygon(polys[val])] if merge else list(polys[val])
        means = None
        if probabilities is not None and val in probabilities:
            means = object_means(geoms, probabilities[val], downsample) / 255.0  # type: ignore[arg-type]
        extras: list[dict[str, float] | None] = (
            [None] * len(geoms) if means is None else [{"Mean class probability": round(float(m), 4)} for m in means]
        )
        if merge:
            feats.extend(qupath_feature(g, cls, object_type, mpp0, extra_measurements=e) for g, e in zip(geoms, extras))
        else:
            feats.extend(_features_fast(geoms, cls, object_type, mpp0, extras))  # type: ignore[arg-type]
    fc = {"type": "FeatureCollection", "features": feats}
    # a structural self-check with the geojson library (geometry validity is ensured by shapely above)
    errors = geojson.FeatureCollection(features=feats[:200]).errors()  # type: ignore[no-untyped-call]
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
    id: str | None = None

    @property
    def class_label(self) -> str:
        """The class name, or ``Unclassified`` for objects QuPath left without one."""
        return self.class_name or UNCLASSIFIED


@dataclass
class ImportReport:
    """What an import kept and what it rejected, with reasons (kept + rejected = features read)."""

    source: str
    annotations: list[Annotation] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    repaired: int = 0
    clipped: int = 0
    total: int = 0

    def summary(self) -> dict[str, Any]:
        classes: dict[str, int] = {}
        for a in self.annotations:
            classes[a.class_label] = classes.get(a.class_label, 0) + 1
        return {
            "source": self.source,
            "features": self.total,
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
            feats = doc.get("features")
            if feats is None:
                return []
            if not isinstance(feats, list):
                raise GeoJSONError(
                    f"{source}: 'features' is a {type(feats).__name__}, not a list; re-export it from QuPath"
                )
            return feats
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
    features = _features_of(doc, source)
    report.total = len(features)
    for k, feat in enumerate(features):
        fid = feat.get("id", k) if isinstance(feat, dict) else k
        if not isinstance(fid, (str, int)):
            fid = k
        try:
            reason = _read_feature(feat, fid, frame, report)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError, OverflowError,
                shapely.errors.ShapelyError) as err:  # fmt: skip
            reason = f"unreadable ({type(err).__name__}: {str(err)[:120]})"
        if reason:
            report.rejected.append(f"feature {fid}: {reason}")
    return report


def _read_feature(feat: Any, fid: Any, frame: Polygon | None, report: ImportReport) -> str | None:
    """Add one feature to ``report.annotations``; return why it was rejected instead (None when kept)."""
    if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
        return "no geometry"
    props = feat.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        return f"properties is a {type(props).__name__}, not an object"
    cls = props.get("classification")
    if cls is None:
        cls = {}
    if not isinstance(cls, dict):
        return f"classification is a {type(cls).__name__}, not an object with a name"
    name = cls.get("name")
    if name is not None and not isinstance(name, str):
        return f"classification name {name!r} is not text"
    color: tuple[int, int, int] | None = None
    if cls.get("color") is not None:
        c = cls["color"]
        if not (isinstance(c, list) and len(c) >= 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c[:3])):
            return f"classification colour {c!r} is not [red, green, blue] in 0-255"
        color = (c[0], c[1], c[2])
    elif isinstance(cls.get("colorRGB"), int):
        color = argb_to_rgb(cls["colorRGB"])
    gtype = feat["geometry"].get("type")
    if gtype not in _GEOMETRY_TYPES:
        return f"geometry type {gtype!r} is not GeoJSON (QuPath writes Polygon/MultiPolygon)"
    try:
        geom = shape(feat["geometry"])
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, shapely.errors.ShapelyError) as err:
        return f"unreadable geometry ({err})"
    if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return f"{geom.geom_type} has no area (only Polygon/MultiPolygon)"
    if not np.isfinite(shapely.get_coordinates(geom)).all():
        return "a coordinate is NaN or infinite"
    try:
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
            report.repaired += 1
    except shapely.errors.GEOSException as err:
        return f"geometry cannot be repaired ({err})"
    polys = _polygons_of(geom)
    if not polys:
        return "no area after repair"
    geom = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if frame is not None and not frame.contains(geom):
        clipped = _polygons_of(geom.intersection(frame))
        if not clipped:
            x1, y1 = frame.bounds[2:]
            return f"lies outside the slide (0..{x1:g}, 0..{y1:g})"
        geom = clipped[0] if len(clipped) == 1 else MultiPolygon(clipped)
        report.clipped += 1
    obj = props.get("objectType") or "annotation"  # 0.2 exports: "id": "PathAnnotationObject"
    if feat.get("id") == "PathDetectionObject":
        obj = "detection"
    fid_text = feat.get("id") if isinstance(feat.get("id"), str) else None
    report.annotations.append(Annotation(geom, name, color, str(obj), dict(props), fid_text))
    return None


_GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "LineString", "MultiPoint",
                   "MultiLineString")  # fmt: skip


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
    except RecursionError as err:
        raise GeoJSONError(f"{p}: JSON nested too deeply to be GeoJSON annotations; re-export it from QuPath") from err
    except IsADirectoryError as err:
        raise GeoJSONError(f"{p}: is a folder; pass the GeoJSON file exported from QuPath") from err
    except OSError as err:
        raise GeoJSONError(f"{p}: cannot read it ({err.strerror}); check the path and permissions") from err
    return parse_qupath_geojson(doc, str(p), bounds_px)


def class_value(name: str | None, class_map: Mapping[str, int]) -> int | None:
    """The label for a class name: exact (case-insensitive) match first, then glob patterns in order.

    ``None`` (no classification) is matched as ``Unclassified``; patterns use ``*``, ``?`` and
    ``[...]`` as in shell globs (``Region*``, ``Tumo?r``).
    """
    label = (name or UNCLASSIFIED).casefold()
    for k, v in class_map.items():
        if k.casefold() == label:
            return v
    for k, v in class_map.items():
        if any(ch in k for ch in "*?[") and fnmatch.fnmatchcase(label, k.casefold()):
            return v
    return None


def resolve_classes(report: ImportReport, class_map: Mapping[str, int]) -> list[tuple[Annotation, int]]:
    """Annotations with their label values; those of unmapped classes move from kept to rejected."""
    keep: list[tuple[Annotation, int]] = []
    for a in report.annotations:
        val = class_value(a.class_name, class_map)
        if val is None:
            report.rejected.append(
                f"feature {a.id or '?'}: class {a.class_label!r} is not one of {sorted(class_map)}; "
                "map it with --class-map NAME=CLASS (globs such as 'Region*=Tissue' work)"
            )
        else:
            keep.append((a, val))
    report.annotations = [a for a, _ in keep]
    return keep


def rasterize_annotations(
    annotations: Iterable[Annotation],
    class_map: Mapping[str, int],
    shape_px: tuple[int, int],
    downsample: float = 1.0,
    unknown: Literal["reject", "ignore"] = "reject",
    report: ImportReport | None = None,
) -> np.ndarray:
    """Burn annotations into a (height, width) uint8 label mask at ``downsample``.

    ``class_map`` maps class names or glob patterns to label values (see :func:`class_value`);
    annotations of other classes are skipped. With ``report`` (and ``unknown="reject"``) its kept
    annotations are drawn instead of ``annotations``, and unmapped ones move to its rejected list.
    Later annotations are drawn over earlier ones.
    """
    if report is not None and unknown == "reject":
        pairs = resolve_classes(report, class_map)
    else:
        pairs = [(a, v) for a in annotations if (v := class_value(a.class_name, class_map)) is not None]
    shapes: list[tuple[Any, int]] = [(mapping(a.geometry), int(v)) for a, v in pairs]
    h, w = shape_px
    if not shapes:
        return np.zeros((h, w), np.uint8)
    return rfeatures.rasterize(
        shapes, out_shape=(h, w), transform=Affine.scale(downsample), fill=0, dtype="uint8", all_touched=False
    )

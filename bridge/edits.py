"""Pathologists' edits back into masks: compare what was exported with what came back.

Everything is compared at the prediction's resolution, rasterised the same way. Per
class: the area the pathologist added (in the edit, not the baseline), removed (in the
baseline, not the edit), and the Dice between them; the corrected mask is the edit
itself. The baseline is the GeoJSON the pathologist was given, so that simplification
and the minimum object area do not look like edits; the comparison with the model's
raw mask is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bridge.geojson import ClassStyle, ImportReport, rasterize_annotations
from zoo.errors import GeoJSONError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def compare_masks(
    predicted: np.ndarray, edited: np.ndarray, classes: Sequence[ClassStyle], px_area_um2: float | None
) -> dict[str, Any]:
    """Per-class added/removed areas and Dice between two label masks of equal shape.

    Areas are in µm² when ``px_area_um2`` (µm² per mask pixel) is given, else in mask pixels.
    """
    if predicted.shape != edited.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {edited.shape}")
    unit = "um2" if px_area_um2 else "px"
    k = px_area_um2 or 1.0
    per_class = {}
    for c in classes:
        p, e = predicted == c.index, edited == c.index
        per_class[c.name] = {
            f"predicted_{unit}": round(float(p.sum()) * k, 2),
            f"edited_{unit}": round(float(e.sum()) * k, 2),
            f"added_{unit}": round(float((e & ~p).sum()) * k, 2),
            f"removed_{unit}": round(float((p & ~e).sum()) * k, 2),
            "dice": round(dice(p, e), 5),
        }
    return {"area_unit": unit, "classes": per_class, "pixels_changed": int((predicted != edited).sum())}


def corrected_mask(
    report: ImportReport,
    classes: Sequence[ClassStyle],
    shape_px: tuple[int, int],
    downsample: float,
    class_aliases: dict[str, str] | None = None,
) -> np.ndarray:
    """Rasterise an edited annotation set into a label mask (the corrected mask).

    ``class_aliases`` maps names or glob patterns used in the edit (e.g. QuPath's ``Region*``,
    or ``Unclassified``) onto model classes. Annotations of classes that map to nothing move
    from ``report.annotations`` to ``report.rejected``.

    Raises:
        GeoJSONError: an alias names a class the model does not have.
    """
    return rasterize_annotations(
        report.annotations, class_lookup(classes, class_aliases), shape_px, downsample, report=report
    )


def class_lookup(classes: Sequence[ClassStyle], class_aliases: dict[str, str] | None = None) -> dict[str, int]:
    """Class name (or pattern) -> label: the model's classes, their QuPath names (``Ignore*`` matched
    literally, not as a pattern), plus ``class_aliases``."""
    class_map = {c.name: c.index for c in classes}
    for c in classes:
        if c.qupath_name and c.qupath_name != c.name:  # glob characters escaped: 'Ignore*' is a name, not a pattern
            class_map["".join(f"[{ch}]" if ch in "*?[" else ch for ch in c.qupath_name)] = c.index
    for alias, target in (class_aliases or {}).items():
        value = next((c.index for c in classes if c.name.casefold() == target.casefold()), None)
        if value is None:
            raise GeoJSONError(
                f"--class-map {alias}={target}: {target!r} is not a class of this mask "
                f"({', '.join(c.name for c in classes)}); map onto one of those"
            )
        class_map[alias] = value
    return class_map


def edit_report(
    model_mask: np.ndarray,
    edited: np.ndarray,
    classes: Sequence[ClassStyle],
    px_area_um2: float | None,
    given: np.ndarray | None = None,
) -> dict[str, Any]:
    """What the pathologist changed, and how far the result is from the model's raw mask.

    ``changes`` compares the edit with what the pathologist was given (``given``: the exported
    GeoJSON rasterised the same way as the edit), so an untouched export reports exactly zero;
    ``vs_model_mask`` compares the edit with the model's mask (simplification and the minimum
    object area count there too). Without ``given``, ``changes`` is measured against the mask.
    """
    fg = [c for c in classes if c.index != 0]
    out = {
        "baseline": "exported GeoJSON" if given is not None else "model mask (no exported GeoJSON given)",
        "changes": compare_masks(given if given is not None else model_mask, edited, fg, px_area_um2),
        "vs_model_mask": compare_masks(model_mask, edited, fg, px_area_um2),
    }
    return out

"""Pathologists' edits back into masks: compare a prediction with edited annotations.

Both masks are compared at the prediction's resolution. Per class: the area the
pathologist added (in the edit, not the prediction), removed (in the prediction,
not the edit), and the Dice between them; the corrected mask is the edit itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bridge.geojson import ClassStyle, ImportReport, rasterize_annotations


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

    ``class_aliases`` maps names used in the edit (e.g. QuPath's "Region*") onto model classes.
    """
    class_map = {c.name: c.index for c in classes}
    for alias, target in (class_aliases or {}).items():
        if target in class_map:
            class_map[alias] = class_map[target]
    return rasterize_annotations(report.annotations, class_map, shape_px, downsample, report=report)

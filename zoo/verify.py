"""``zoo verify``: weights' sha256 and a reproducibility run on each model's bundled test input."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.errors import RegistryError
from zoo.registry import ModelEntry, Registry, verified_weights


def verify_model(entry: ModelEntry, registry: Registry) -> dict[str, Any]:
    """Check ``entry``'s weights and, if it has a test, its output on the bundled input.

    Returns a dict with ``ok``, ``model`` and ``detail`` (max absolute difference and tolerance).

    Raises:
        ChecksumMismatchError, WeightsNotFoundError: the weights are not the pinned ones.
    """
    from zoo.runner import OnnxModel

    path = verified_weights(entry, registry)
    if entry.test is None:
        return {"model": entry.id, "ok": True, "detail": "sha256 ok; no bundled test"}
    x, expected = (_load_test_array(entry, registry, f) for f in (entry.test.input, entry.test.expected))
    model = OnnxModel(path, entry, providers=["CPUExecutionProvider"])
    got = model.session.run([entry.output.output_name], {entry.input.input_name: x})[0]
    diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    ok = got.shape == expected.shape and diff <= entry.test.atol
    return {
        "model": entry.id,
        "ok": ok,
        "max_abs_diff": diff,
        "atol": entry.test.atol,
        "detail": f"sha256 ok; test output max |diff| {diff:.2e} (tolerance {entry.test.atol:.0e})",
    }


def _load_test_array(entry: ModelEntry, registry: Registry, name: str) -> np.ndarray:
    path = registry.resolve(name)
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as err:
        what = "not found" if not path.exists() else "is a folder" if path.is_dir() else "not a .npy array"
        raise RegistryError(
            f"{path}: bundled test file of {entry.id} {what}; restore it (reinstall the package) or fix test: "
            f"in {registry.path}"
        ) from err


def write_test_io(entry: ModelEntry, registry: Registry, slide_path: str, input_path: str, expected_path: str) -> float:
    """Make ``entry``'s bundled test: one real input from ``slide_path`` and the model's output for it.

    The input is the centre patch (tiled models, at the model's target resolution) or the
    whole-slide thumbnail (whole-slide models), preprocessed as the runner does.
    Returns the fraction of foreground pixels in the expected output (a sanity figure).
    """
    from PIL import Image

    from zoo.runner import OnnxModel
    from zoo.slide import choose_level, model_dimensions, open_slide, read_scaled, thumbnail

    model = OnnxModel(verified_weights(entry, registry), entry, providers=["CPUExecutionProvider"])
    pw, ph = entry.input.patch_size_px
    with open_slide(slide_path) as slide:
        if entry.input.mode == "whole-slide":
            thumb, _ = thumbnail(slide, 2048)
            tile = np.asarray(Image.fromarray(thumb).resize((pw, ph), Image.Resampling.BILINEAR))
        else:
            choice = choose_level(slide, target_mpp=entry.input.target_mpp)
            w, h = model_dimensions(slide, choice)
            tile = read_scaled(slide, choice, max(0, (w - pw) // 2), max(0, (h - ph) // 2), pw, ph)
    x = model.preprocess(tile[None])
    y = model.session.run([entry.output.output_name], {entry.input.input_name: x})[0]
    np.save(input_path, x)
    np.save(expected_path, y)
    return float((y >= entry.output.threshold).mean())

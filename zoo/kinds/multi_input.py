"""Kind ``multi-input``: tiles to pixels, each tile fed with centred context tiles at other resolutions.

Seed 002's multi-level U-Net takes a high-resolution tile and a low-resolution tile centred on it.
The entry's ``context_inputs`` declare each extra ONNX input's size and um/px; the runner reads them
beside every tile (white beyond the slide's edge, as in training) and blends the per-pixel
probabilities of overlapping tiles exactly as for ``segmentation`` (:func:`zoo.runner.run_tiled`).
"""

from __future__ import annotations

from zoo.engines.model import OnnxModel
from zoo.registry import ModelEntry
from zoo.runner import Prediction, RunOptions, run_tiled
from zoo.slide import Slide


def predict(slide: Slide, entry: ModelEntry, models: dict[str, OnnxModel], opts: RunOptions) -> Prediction:
    return run_tiled(slide, models[entry.stage_name], opts)

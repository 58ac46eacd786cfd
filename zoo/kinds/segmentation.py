"""Kind ``segmentation``: overlapping tiles (or the whole slide) to per-pixel class probabilities."""

from __future__ import annotations

from zoo.engines.model import OnnxModel
from zoo.registry import ModelEntry
from zoo.runner import Prediction, RunOptions, predict_slide
from zoo.slide import Slide


def predict(slide: Slide, entry: ModelEntry, models: dict[str, OnnxModel], opts: RunOptions) -> Prediction:
    """See :func:`zoo.runner.run_tiled` and :func:`zoo.runner.run_whole_slide`."""
    return predict_slide(slide, models[entry.stage_name], opts)

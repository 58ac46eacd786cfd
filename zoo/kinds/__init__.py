"""Model kinds: one small runner module per kind, picked by the registry entry's ``kind``.

* ``segmentation`` (:mod:`zoo.kinds.segmentation`): tiles (or the whole slide) to per-pixel probabilities;
* ``patch-classification`` (:mod:`zoo.kinds.patch_classification`): one probability per class per tile,
  averaged where tiles overlap into a heatmap at the tile stride (seed 001), tiles sifted by the tissue
  pre-mask and optional entropy rails;
* ``cascade`` (:mod:`zoo.kinds.cascade`): named stages, each its own network, fed by the slide and/or
  earlier stages (H2G-Net, seed 004);
* ``multi-input`` (:mod:`zoo.kinds.multi_input`): tiles to pixels, each tile fed with centred context
  tiles at other resolutions (seed 002).

Each module has ``predict(slide, entry, models, opts) -> Prediction`` where ``models`` maps stage
names (``entry.networks()``) to loaded :class:`zoo.engines.model.OnnxModel` objects. Adding a kind means a
module here and a value of ``ModelKind`` in :mod:`zoo.registry`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoo.engines.model import OnnxModel
    from zoo.registry import ModelEntry
    from zoo.runner import Prediction, RunOptions
    from zoo.slide import Slide

KIND_MODULES = {
    "segmentation": "zoo.kinds.segmentation",
    "patch-classification": "zoo.kinds.patch_classification",
    "cascade": "zoo.kinds.cascade",
    "multi-input": "zoo.kinds.multi_input",
}


def predict(slide: Slide, entry: ModelEntry, models: dict[str, OnnxModel], opts: RunOptions) -> Prediction:
    """Run ``entry`` on ``slide`` with the runner module of its kind."""
    module = importlib.import_module(KIND_MODULES[entry.kind])
    pred: Prediction = module.predict(slide, entry, models, opts)
    pred.stats.setdefault("kind", entry.kind)
    return pred

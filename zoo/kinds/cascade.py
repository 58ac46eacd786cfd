"""Kind ``cascade`` (H2G-Net, seed 004 Fig. 3): named stages, each its own network.

The entry's own network is the first stage, a patch classifier (:mod:`zoo.kinds.patch_classification`)
giving a heatmap at the tile stride. Each later stage (``entry.stages``) concatenates its sources
along channels: the slide's low-resolution image resized to the stage's ``input.patch_size_px``
(bilinear, aspect not kept, as H2G-Net and FAST's ImageResizer do) and scaled by the stage's input
spec, and/or an earlier stage's class probability map resized to the same size (0-1). The last
stage's probabilities are resized back to the slide's aspect, longest side ``patch_size_px``, for
the label mask and heatmaps. run.json gets per-stage seconds and shapes.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from zoo.engines.model import OnnxModel
from zoo.kinds.patch_classification import classify_tiles
from zoo.labelmask import LabelMask
from zoo.registry import ModelEntry
from zoo.runner import Prediction, RunOptions, class_probability_rows, labels_from_probabilities
from zoo.slide import Slide, thumbnail


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of one float32 (H, W) plane."""
    return np.asarray(
        Image.fromarray(plane.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )


def _class_planes(prob: np.ndarray, entry: ModelEntry) -> dict[str, np.ndarray]:
    """(C, H, W) probabilities to class name -> plane (softmax: channel per class in index order)."""
    order = sorted(entry.classes, key=lambda c: c.index)
    if prob.shape[0] == len(order):
        return {c.name: prob[k] for k, c in enumerate(order)}
    fg = entry.foreground
    return {c.name: prob[k] for k, c in enumerate(fg)}


def predict(slide: Slide, entry: ModelEntry, models: dict[str, OnnxModel], opts: RunOptions) -> Prediction:
    """Stage 1 tile by tile, then each later stage on whole-slide inputs (the slide's low-resolution image is
    read on a side thread while stage 1 runs)."""
    t0 = time.perf_counter()
    low_side = max((max(st.input.patch_size_px) * 2 for st in entry.stages
                    if any(src.source == "slide" for src in st.sources)), default=0)  # fmt: skip
    with ThreadPoolExecutor(1, thread_name_prefix="cascade-thumbnail") as side:
        low_future = side.submit(thumbnail, slide, low_side) if low_side else None
        grid = classify_tiles(slide, entry, models[entry.stage_name], opts)
        low_read = low_future.result() if low_future is not None else None
    planes: dict[str, dict[str, np.ndarray]] = {entry.stage_name: _class_planes(grid.prob, entry)}
    stage_stats: dict[str, Any] = {entry.stage_name: {"seconds": grid.stats["seconds_total"], **grid.stats}}
    low: np.ndarray | None = low_read[0] if low_read is not None else None
    prob = grid.prob
    views = dict(entry.networks())
    for st in entry.stages:
        ts = time.perf_counter()
        model = models[st.name]
        w, h = st.input.patch_size_px
        channels: list[tuple[str, np.ndarray]] = []  # (ONNX input, (C, h, w) values before scaling)
        for src in st.sources:
            if src.source == "slide":
                if low is None:
                    low, _ = thumbnail(slide, max_side_px=max(w, h) * 2)
                small = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR), np.float32)
                if st.input.channel_order == "BGR":
                    small = small[..., ::-1]
                value = small.transpose(2, 0, 1)
            else:
                value = _resize(planes[src.source][src.class_name or ""], w, h)[None]
            channels.append((st.feeds(src), value))
        stacked = np.concatenate([v for _, v in channels], 0)
        mean = np.asarray(st.input.mean, np.float32)[:, None, None]
        std = np.asarray(st.input.std, np.float32)[:, None, None]
        scaled = (stacked * st.input.scale - mean) / std
        feeds: dict[str, list[np.ndarray]] = {}
        k = 0
        for name, v in channels:
            feeds.setdefault(name, []).append(scaled[k : k + v.shape[0]])
            k += v.shape[0]
        arrays = {}
        for name, parts in feeds.items():
            x = np.concatenate(parts, 0)[None].astype(np.float32)
            arrays[name] = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if st.input.layout == "NHWC" else x)
        ti = time.perf_counter()
        prob = model.predict_feeds(arrays)[0]
        t_inference = time.perf_counter() - ti
        planes[st.name] = _class_planes(prob, views[st.name])
        stage_stats[st.name] = {
            "seconds": round(time.perf_counter() - ts, 3),
            "seconds_inference": round(t_inference, 3),
            "inputs": {n: list(a.shape) for n, a in arrays.items()},
        }
    # last stage back to the slide's aspect, longest side = its output size
    w0, h0 = slide.dimensions
    side = max(prob.shape[1:])
    ds = max(1.0, max(w0, h0) / side)  # never finer than the slide: a small slide keeps its own resolution
    mw, mh = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    up = np.stack([_resize(p, mw, mh) for p in prob])
    labels = labels_from_probabilities(up, entry)
    mask = LabelMask(mh, mw, opts.scratch_dir)
    mask.write_rows(0, labels)
    heatmaps, sums = {}, {}
    for idx, raster in class_probability_rows(up, entry).items():
        heatmaps[idx] = LabelMask(mh, mw, opts.scratch_dir)
        heatmaps[idx].write_rows(0, raster)
        sums[idx] = float(raster[labels == idx].sum(dtype=np.int64))
    ch = grid.choice
    stats = {
        **{k: v for k, v in grid.stats.items() if k.startswith("tiles")},
        "stages": stage_stats,
        "seconds_per_stage": {k: v["seconds"] for k, v in stage_stats.items()},
        "model_dimensions_px": [mw, mh],
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    return Prediction(mask, ds, ch.mpp0 * ds, ch, stats, heatmaps, sums)

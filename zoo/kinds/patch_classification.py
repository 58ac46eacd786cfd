"""Kind ``patch-classification``: one probability per class per tile, as a heatmap at the tile stride.

Tiles of ``input.patch_size_px`` at ``input.target_mpp`` overlap by ``input.overlap``. The heatmap has
one cell per stride step; each cell holds the mean of the probabilities of the classified tiles that
cover it (seed 001: "pixel-level diagnostic probabilities may be computed by averaging the tile-level
probabilities for each pixel"), and the label mask is the argmax (softmax) or threshold (sigmoid) of
the cells. Tiles are sifted before inference by the tissue pre-mask (glass) and, when the entry has
them, by seed 001's entropy rails; run.json counts the tiles each removed. Cells no classified tile
covers are background with probability 0.

Each row of tiles is read once as one band (only the span between its first and last kept tile),
so overlapping tiles are not decoded twice; rows are read and sifted on a reader thread a few rows ahead
of the engine. Memory: a few bands plus the (small) cell grid.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from zoo.engines.model import OnnxModel
from zoo.errors import raise_if_signalled
from zoo.labelmask import LabelMask
from zoo.registry import ModelEntry
from zoo.runner import (
    Prediction,
    RunOptions,
    _progress,
    auto_batch_size,
    class_probability_rows,
    labels_from_probabilities,
    plan_tiles,
    predict_tiles,
)
from zoo.slide import LevelChoice, Slide, read_scaled


def grey_entropy_bits(tiles: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of the 8-bit ITU-R 601 grey-level histogram of each (N, H, W, 3) uint8 tile."""
    x = tiles.astype(np.float32)
    grey = np.clip(np.rint(x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114), 0, 255).astype(np.int64)
    n = grey.shape[0]
    flat = grey.reshape(n, -1) + (np.arange(n)[:, None] * 256)
    hist = np.bincount(flat.ravel(), minlength=256 * n).reshape(n, 256).astype(np.float64)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(-np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1))


@dataclass
class TileGrid:
    """Per-cell mean class probabilities of the classified tiles.

    Attributes:
        prob: (C, rows, cols) float32 mean probability per cell (0 where ``count`` is 0).
        count: (rows, cols) number of classified tiles covering each cell.
        choice: the level the tiles were read at.
        cell_px: (x, y) model pixels per cell (the tile stride).
        stats: tile counts per selector and seconds.
    """

    prob: np.ndarray
    count: np.ndarray
    choice: LevelChoice
    cell_px: tuple[int, int]
    stats: dict[str, Any] = field(default_factory=dict)


def classify_tiles(slide: Slide, entry: ModelEntry, model: OnnxModel, opts: RunOptions) -> TileGrid:
    """Sift and classify the tiles of ``slide`` with ``model``; see the module docstring."""
    t0 = time.perf_counter()
    premask_opts = replace(opts, skip_background=opts.skip_background and entry.selection.tissue_premask)
    plan = plan_tiles(slide, entry, premask_opts)
    pw, ph = entry.input.patch_size_px
    sx, sy = plan.stride_px
    cols, rows = math.ceil(plan.width_px / sx), math.ceil(plan.height_px / sy)
    n_cls = entry.output.channels
    acc = np.zeros((n_cls, rows, cols), np.float64)
    cnt = np.zeros((rows, cols), np.int32)
    rails = entry.selection.entropy_rails
    by_row: dict[int, list[int]] = {}
    for j, i in plan.jobs:
        by_row.setdefault(j, []).append(i)
    read_s = infer_s = select_s = wait_s = 0.0
    n_rails_out = n_run = 0
    entropies: list[float] = []
    bs = max(1, opts.batch_size or auto_batch_size(entry))
    pending: list[tuple[int, int, np.ndarray]] = []

    def run_pending() -> None:
        nonlocal infer_s, n_run
        if not pending:
            return
        ti = time.perf_counter()
        ds = plan.choice.downsample
        at = [(round(plan.xs[i] * ds), round(plan.ys[j] * ds)) for j, i, _ in pending]
        probs = predict_tiles(model, model.preprocess(np.stack([t for _, _, t in pending])), at)
        infer_s += time.perf_counter() - ti
        for (j, i, _), p in zip(pending, probs, strict=True):
            x, y = plan.xs[i], plan.ys[j]
            # the cells whose centres lie inside the tile (exact for tiles on the stride grid and
            # for the last tile of a row/column, which is flush with the slide's edge)
            c0, c1 = max(0, math.ceil(x / sx - 0.5)), min(cols, math.ceil((x + pw) / sx - 0.5))
            r0, r1 = max(0, math.ceil(y / sy - 0.5)), min(rows, math.ceil((y + ph) / sy - 0.5))
            acc[:, r0:r1, c0:c1] += p.reshape(n_cls, 1, 1)
            cnt[r0:r1, c0:c1] += 1
        n_run += len(pending)
        pending.clear()

    def read_row(j: int, cols_i: list[int]) -> tuple[int, list[int], np.ndarray, np.ndarray, float, float]:
        """One row of tiles, read once as a band, and which of them pass the rails (on the reader thread)."""
        tr = time.perf_counter()
        x_lo, x_hi = plan.xs[cols_i[0]], plan.xs[cols_i[-1]] + pw
        band = read_scaled(slide, plan.choice, x_lo, plan.ys[j], x_hi - x_lo, ph)
        tiles = np.stack([band[:, plan.xs[i] - x_lo : plan.xs[i] - x_lo + pw] for i in cols_i])
        ts = time.perf_counter()
        h = grey_entropy_bits(tiles) if rails is not None else np.zeros(0)
        return j, cols_i, tiles, h, ts - tr, time.perf_counter() - ts

    rows_todo = iter(sorted(by_row.items()))
    readers = max(1, opts.reader_threads)
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="tile-reader")
    ahead: deque[Future[Any]] = deque()  # taken in the order submitted: the same result with any number of readers

    def top_up() -> None:  # rows are read and sifted while the engine classifies the previous ones
        while len(ahead) < max(2, opts.prefetch_batches, 2 * readers):
            row = next(rows_todo, None)
            if row is None:
                return
            ahead.append(pool.submit(read_row, *row))

    bar = _progress(len(plan.jobs), opts.progress_label or slide.path.name, opts.progress)
    try:
        top_up()
        while ahead:
            tw = time.perf_counter()
            j, cols_i, tiles, h, t_read, t_select = ahead.popleft().result()
            wait_s += time.perf_counter() - tw
            top_up()
            read_s += t_read
            select_s += t_select
            keep = np.ones(len(cols_i), bool)
            if rails is not None:
                entropies.extend(h.tolist())
                keep = (h >= rails.min_bits) & (h <= rails.max_bits)
                n_rails_out += int((~keep).sum())
            for i, t, k in zip(cols_i, tiles, keep, strict=True):
                if k:
                    pending.append((j, i, t))
                    if len(pending) >= bs:
                        run_pending()
            bar.update(len(cols_i))
            raise_if_signalled()
        run_pending()
    finally:
        for f in ahead:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    prob = (acc / np.maximum(cnt, 1)).astype(np.float32)
    total = len(plan.xs) * len(plan.ys)
    stats: dict[str, Any] = {
        "tiles_total": total,
        "tiles_removed_by_premask": total - len(plan.jobs),
        "tiles_removed_by_entropy_rails": n_rails_out if rails is not None else None,
        "tiles_run": n_run,
        "bad_tiles": list(slide.bad_tiles),
        "tile_px": [pw, ph],
        "stride_px": [sx, sy],
        "heatmap_cells": [cols, rows],
        "model_dimensions_px": [plan.width_px, plan.height_px],
        "premask_tissue_fraction": None if plan.premask_fraction is None else round(plan.premask_fraction, 5),
        "seconds_breakdown": {
            "premask": round(plan.premask_s, 3),
            "read_decode_resample (thread)": round(read_s, 3),
            "entropy_rails (thread)": round(select_s, 3),
            "inference": round(infer_s, 3),
            "waiting_for_reader": round(wait_s, 3),
        },
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    if rails is not None:
        stats["entropy_rails_bits"] = [rails.min_bits, rails.max_bits]
    return TileGrid(prob, cnt, plan.choice, (sx, sy), stats)


def grid_prediction(grid: TileGrid, entry: ModelEntry, opts: RunOptions) -> Prediction:
    """The label mask and probability heatmaps at one pixel per cell."""
    rows, cols = grid.count.shape
    labels = labels_from_probabilities(grid.prob, entry)
    labels[grid.count == 0] = 0
    mask = LabelMask(rows, cols, opts.scratch_dir)
    mask.write_rows(0, labels)
    heatmaps, sums = {}, {}
    for idx, raster in class_probability_rows(grid.prob, entry).items():
        raster[grid.count == 0] = 0
        heatmaps[idx] = LabelMask(rows, cols, opts.scratch_dir)
        heatmaps[idx].write_rows(0, raster)
        sums[idx] = float(raster[labels == idx].sum(dtype=np.int64))
    cell, ch = grid.cell_px[0], grid.choice
    return Prediction(mask, ch.downsample * cell, ch.mpp * cell, ch, grid.stats, heatmaps, sums)


def predict(slide: Slide, entry: ModelEntry, models: dict[str, OnnxModel], opts: RunOptions) -> Prediction:
    return grid_prediction(classify_tiles(slide, entry, models[entry.stage_name], opts), entry, opts)

"""Run a registered ONNX model over a slide, streaming, in bounded memory.

The network is an :class:`zoo.engines.model.OnnxModel` (the engines are :mod:`zoo.engines`; nothing here
imports one). Steps: choose the level (and an extra
integer downsampling) for the model's µm/px; a thumbnail pre-mask skips glass
before any full-resolution read; overlapping tiles are read and normalised on
reader threads (``reader_threads``; batches are consumed in order) while the engine
runs batches; probabilities are averaged in the overlaps inside a band one tile high
that slides down the slide, and rows that no later tile touches are thresholded into the label mask. Peak memory is the
band plus the prefetch queue plus the slide reader's tile cache: the label mask
goes to a scratch file once it is large (:class:`zoo.labelmask.LabelMask`), with
class counts kept per band.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from zoo.engines.model import OnnxModel
from zoo.errors import ModelInputError, ModelOutputError, raise_if_signalled
from zoo.labelmask import UNKNOWN_LABEL, LabelMask
from zoo.registry import ContextInput, ModelEntry
from zoo.slide import (
    LevelChoice,
    Slide,
    box_reduce,
    choose_level,
    level_region,
    model_dimensions,
    read_scaled,
    region_is_large,
    slide_base_mpp,
    thumbnail,
)
from zoo.tissue import reference_labels


@dataclass
class RunOptions:
    """How to run a model over a slide.

    Attributes:
        target_mpp: µm/px to run at (default: the model's ``input.target_mpp``).
        level: force a pyramid level instead of ``target_mpp``.
        slide_mpp: level-0 µm/px to assume when the slide has none.
        force_slide_mpp: use ``slide_mpp`` even when the slide states another resolution.
        batch_size: tiles per engine call (None: :func:`auto_batch_size` of the model's tile size).
        providers: ONNX Runtime execution providers; None picks CUDA when present, then CPU.
        threads: intra-op threads for the CPU provider (0: one per core).
        skip_background: skip tiles whose footprint has no tissue in the thumbnail pre-mask.
        prefetch_batches: batches read ahead of inference.
        reader_threads: threads reading, decoding and normalising tiles (a GPU needs several to be fed).
        progress: show a progress bar on stderr.
        progress_label: the bar's label (default: the slide's file name).
        device: GPU index for the CUDA provider or the torch engine (None: the default GPU, or the CPU without one).
        scratch_dir: where a large label mask is memory-mapped (default: system temp).
        premask: the slide's background pre-mask and its downsample when already computed
            (:func:`background_premask`; ``zoo run`` computes it while the engine compiles).
    """

    target_mpp: float | None = None
    level: int | None = None
    slide_mpp: float | None = None
    force_slide_mpp: bool = False
    batch_size: int | None = None
    providers: list[str] | None = None
    threads: int = 0
    skip_background: bool = True
    prefetch_batches: int = 4
    reader_threads: int = 1
    progress: bool = True
    progress_label: str | None = None
    device: int | None = None
    scratch_dir: Path | None = None
    premask: tuple[np.ndarray, float] | None = None


@dataclass
class Prediction:
    """A model's label mask for one slide.

    Attributes:
        mask: (height, width) uint8 class indices at ``downsample`` (``UNKNOWN_LABEL`` where
            the slide could not be decoded and ``on_bad_tile`` was ``skip``).
        downsample: level-0 pixels per mask pixel.
        mpp: µm per mask pixel (None when the slide has no resolution and none was assumed).
        choice: the level choice (tiled models).
        stats: counts and timings.
        probabilities: foreground class index -> (height, width) uint8 raster of that class's
            probability x 255 (the heatmap QuPath and FAST overlay; 0 where nothing was inferred).
    """

    mask: LabelMask
    downsample: float
    mpp: float | None
    choice: LevelChoice | None
    stats: dict[str, Any] = field(default_factory=dict)
    probabilities: dict[int, LabelMask] = field(default_factory=dict)
    probability_sums: dict[int, float] = field(default_factory=dict)

    def mean_class_probability(self) -> dict[int, float]:
        """Per class: the mean of its probability over the pixels labelled with it (0-1)."""
        counts = self.mask.class_counts()
        return {i: s / 255.0 / counts[i] for i, s in self.probability_sums.items() if counts[i]}

    def close(self) -> None:
        """Release the scratch files of the mask and the probability rasters."""
        self.mask.close()
        for p in self.probabilities.values():
            p.close()

    def class_fractions(self) -> dict[int, float]:
        """Fraction of mask pixels per label value (from counts kept while the mask was written)."""
        counts = self.mask.class_counts()
        total = max(1, int(counts.sum()))
        return {int(i): counts[i] / total for i in np.nonzero(counts)[0]}


def predict_tiles(
    model: OnnxModel, x: np.ndarray | dict[str, np.ndarray], tiles_px: Sequence[tuple[int, int]]
) -> np.ndarray:
    """``model.predict(x)``; an output that is not a probability names its tile's (x, y) in level-0 px."""
    try:
        return model.predict(x)
    except ModelOutputError as err:
        if err.batch_index is None or err.batch_index >= len(tiles_px) or not err.where:
            raise
        tx, ty = tiles_px[err.batch_index]
        raise ModelOutputError(str(err).replace(err.where, f"tile at x={tx}, y={ty} (level-0 px)")) from err


def class_probability_rows(prob: np.ndarray, entry: ModelEntry) -> dict[int, np.ndarray]:
    """(C, H, W) network probabilities to foreground class index -> (H, W) uint8 probability x 255."""
    fg = entry.foreground
    if entry.output.activation == "sigmoid" and prob.shape[0] == 1:
        chans = {fg[0].index: prob[0]}
    elif entry.output.activation == "sigmoid":
        chans = {c.index: prob[k] for k, c in enumerate(fg)}
    else:
        order = sorted(entry.classes, key=lambda c: c.index)
        chans = {c.index: prob[k] for k, c in enumerate(order) if c.index != 0}
    return {i: np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8) for i, p in chans.items()}


def labels_from_probabilities(prob: np.ndarray, entry: ModelEntry) -> np.ndarray:
    """(C, H, W) probabilities to (H, W) uint8 class indices of ``entry``'s classes: a sigmoid class, or the class
    of a softmax over background and one class, where its probability reaches ``output.threshold``; the argmax
    of a softmax over more classes."""
    out = entry.output
    if out.activation == "sigmoid" and prob.shape[0] == 1:
        fg = entry.foreground[0].index
        above = (prob[0] >= out.threshold).view(np.uint8)  # bool to 0/1 without a copy
        return above if fg == 1 else above * np.uint8(fg)
    if out.activation == "sigmoid":
        fg_idx = np.array([c.index for c in entry.foreground], np.uint8)
        best = prob.argmax(axis=0)
        return np.where(prob.max(axis=0) >= out.threshold, fg_idx[best], 0).astype(np.uint8)
    idx = np.array([c.index for c in sorted(entry.classes, key=lambda c: c.index)], np.uint8)
    if prob.shape[0] == 2:  # background and one class: the class where its probability reaches the threshold
        return np.where(prob[1] >= out.threshold, idx[1], idx[0]).astype(np.uint8)
    return idx[prob.argmax(axis=0)]


#: tiles of this many pixels make one engine call by default (8 tiles of 256 x 256 px)
BATCH_PIXELS = 8 * 256 * 256


def auto_batch_size(entry: ModelEntry) -> int:
    """Tiles per engine call when none is asked for: as many pixels as 8 tiles of 256 px (57 tiles of 96 px,
    2 of 512 px), so small patch networks are not starved by per-call overhead and large tiles stay in cache."""
    w, h = entry.input.patch_size_px
    return max(1, round(BATCH_PIXELS / (w * h)))


def tile_positions(length: int, patch: int, stride: int) -> list[int]:
    if length <= patch:
        return [0]
    pos = list(range(0, length - patch + 1, stride))
    if pos[-1] + patch < length:
        pos.append(length - patch)
    return pos


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", file=sys.stderr, disable=not enabled, leave=False)


def background_premask(slide: Slide, max_side_px: int = 1024) -> tuple[np.ndarray, float]:
    """Permissive tissue pre-mask (dilated reference labels) and its downsample."""
    thumb, ds = thumbnail(slide, max_side_px=max_side_px)
    mask = reference_labels(thumb, min_object_px=4, max_hole_px=0)
    return ndi.binary_dilation(mask, iterations=3), ds


@dataclass(frozen=True)
class TilePlan:
    """Which tiles a tiled model runs on a slide, in model pixels at ``choice``.

    Attributes:
        choice: pyramid level and extra downsampling.
        width_px, height_px: slide size at ``choice``.
        stride_px: (x, y) step between tiles (patch size less the overlap).
        xs, ys: tile origins along x and y (overlapping, the last flush with the edge).
        jobs: (row, column) indices into ``ys``/``xs`` of the tiles to run, row-major.
        premask_s: seconds spent on the background pre-mask.
        premask_fraction: fraction of the slide the pre-mask calls tissue (None when not run).
    """

    choice: LevelChoice
    width_px: int
    height_px: int
    stride_px: tuple[int, int]
    xs: list[int]
    ys: list[int]
    jobs: list[tuple[int, int]]
    premask_s: float
    premask_fraction: float | None = None


def plan_tiles(slide: Slide, entry: ModelEntry, opts: RunOptions) -> TilePlan:
    """The level choice and the overlapping tiles to run, glass skipped by the thumbnail pre-mask."""
    spec = entry.input
    choice = choose_level(
        slide,
        target_mpp=opts.target_mpp or spec.target_mpp,
        level=opts.level,
        slide_mpp=opts.slide_mpp,
        force_slide_mpp=opts.force_slide_mpp,
    )
    width, height = model_dimensions(slide, choice)
    pw, ph = spec.patch_size_px
    sx, sy = max(1, round(pw * (1 - spec.overlap))), max(1, round(ph * (1 - spec.overlap)))
    xs, ys = tile_positions(width, pw, sx), tile_positions(height, ph, sy)
    t0 = time.perf_counter()
    keep: np.ndarray | None = None
    pre_fraction = None
    if opts.skip_background:
        pre, pre_ds = opts.premask or background_premask(slide)
        pre_fraction = float(pre.mean())
        scale = choice.downsample / pre_ds  # premask pixels per model pixel
        keep = np.zeros((len(ys), len(xs)), bool)
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                y0, x0 = int(y * scale), int(x * scale)
                y1, x1 = math.ceil((y + ph) * scale), math.ceil((x + pw) * scale)
                keep[j, i] = bool(pre[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].any())
    jobs = [(j, i) for j in range(len(ys)) for i in range(len(xs)) if keep is None or keep[j, i]]
    return TilePlan(choice, width, height, (sx, sy), xs, ys, jobs, time.perf_counter() - t0, pre_fraction)


class BlendBand:
    """The band one tile high that slides down the slide: tile probabilities are summed where tiles overlap,
    and rows that no later tile touches are averaged, thresholded and written into the label mask and the
    per-class probability rasters (glass never inferred is 0; tiles ``--on-bad-tile skip`` masked are unknown).
    """

    def __init__(self, slide: Slide, entry: ModelEntry, choice: LevelChoice, width: int, height: int,
                 scratch_dir: Path | None) -> None:  # fmt: skip
        self.slide, self.entry, self.choice = slide, entry, choice
        self.width, self.height = width, height
        self.pw, self.ph = entry.input.patch_size_px
        self.mask = LabelMask(height, width, scratch_dir)
        self.heatmaps = {c.index: LabelMask(height, width, scratch_dir, counted=False) for c in entry.foreground}
        self.prob_sums = dict.fromkeys(self.heatmaps, 0.0)
        self.acc = np.zeros((entry.output.channels, self.ph, width + self.pw), np.float32)  # rows [y, y + ph)
        self.cnt = np.zeros((self.ph, width + self.pw), np.float32)
        self.y = 0
        self.blend_s = self.flush_s = 0.0

    def add(self, tx: int, ty: int, prob: np.ndarray) -> None:
        """Sum one tile's (C, ph, pw) probabilities in at (tx, ty) model pixels (tiles come row by row)."""
        if ty > self.y:
            self.flush(ty)
        t = time.perf_counter()
        r = ty - self.y
        self.acc[:, r : r + self.ph, tx : tx + self.pw] += prob
        self.cnt[r : r + self.ph, tx : tx + self.pw] += 1
        self.blend_s += time.perf_counter() - t

    def flush(self, until_y: int) -> None:
        """Finalise mask rows [y, until_y) and slide the band down (at most one band per step)."""
        t = time.perf_counter()
        entry, ph, width = self.entry, self.ph, self.width
        until_y = min(until_y, self.height)
        while self.y < until_y:
            n = min(until_y - self.y, ph)
            c = self.cnt[:n, :width]
            prob = self.acc[:, :n, :width] / np.maximum(c, 1e-6)
            lab = labels_from_probabilities(prob, entry)
            glass = c == 0  # never inferred (background skipped)
            lab[glass] = 0
            for x0, y0, x1, y1 in _bad_boxes(self.slide, self.choice.downsample):  # --on-bad-tile skip: unknown
                r0, r1 = max(y0, self.y) - self.y, min(y1, self.y + n) - self.y
                if r1 > r0:
                    lab[r0:r1, max(0, x0) : max(0, x1)] = UNKNOWN_LABEL
            self.mask.write_rows(self.y, lab)
            for idx, rows in class_probability_rows(prob, entry).items():
                rows[glass] = 0
                self.heatmaps[idx].write_rows(self.y, rows)
                self.prob_sums[idx] += float(rows[lab == idx].sum(dtype=np.int64))
            self.acc[:, : ph - n] = self.acc[:, n:].copy()
            self.acc[:, ph - n :] = 0
            self.cnt[: ph - n] = self.cnt[n:].copy()
            self.cnt[ph - n :] = 0
            self.y += n
        self.flush_s += time.perf_counter() - t


class TileReader:
    """Batches of the plan's tiles read, decoded, resampled and normalised on ``reader_threads`` threads,
    ``prefetch_batches`` ahead, handed out in order (with each context input's centred tile, if any)."""

    def __init__(self, slide: Slide, model: OnnxModel, plan: TilePlan, opts: RunOptions) -> None:
        entry = model.entry
        self.slide, self.model, self.plan = slide, model, plan
        self.contexts = [
            (c, choose_level(slide, target_mpp=c.target_mpp, slide_mpp=opts.slide_mpp,
                             force_slide_mpp=opts.force_slide_mpp))
            for c in entry.context_inputs
        ]  # fmt: skip
        bs = max(1, opts.batch_size or auto_batch_size(model.entry))
        self.batches = iter([plan.jobs[k : k + bs] for k in range(0, len(plan.jobs), bs)])
        n_readers = max(1, opts.reader_threads)
        self.ahead = max(1, opts.prefetch_batches) + n_readers - 1
        self.pool = ThreadPoolExecutor(max_workers=n_readers, thread_name_prefix="tile-reader")
        self.pending: deque[Future[Any]] = deque()
        self.split = {"read_decode": 0.0, "resample": 0.0, "normalise": 0.0}
        self.wait_s = 0.0

    def read_batch(self, b: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], Any, tuple[float, float, float]]:
        """One batch of tiles as the network's input (on a reader thread), with the seconds of each step."""
        slide, choice, xs, ys, model = self.slide, self.plan.choice, self.plan.xs, self.plan.ys, self.model
        pw, ph = model.entry.input.patch_size_px
        t_a = time.perf_counter()
        if region_is_large(choice, pw, ph):  # far coarser than any level: read and reduce in strips
            tiles = np.stack([read_scaled(slide, choice, xs[i], ys[j], pw, ph) for j, i in b])
            t_b = t_c = time.perf_counter()
        else:
            regions = [level_region(slide, choice, xs[i], ys[j], pw, ph) for j, i in b]
            t_b = time.perf_counter()
            tiles = np.stack([box_reduce(r, choice.factor) for r in regions])
            t_c = time.perf_counter()
        x: Any = model.preprocess(tiles)
        if self.contexts:  # multi-input models: centred context tiles, one ONNX input each
            x = {model.entry.input.input_name: x}
            for spec, ctx_choice in self.contexts:
                x[spec.input_name] = model.preprocess(
                    np.stack(
                        [context_tile(slide, choice, ctx_choice, spec, xs[i] + pw / 2, ys[j] + ph / 2) for j, i in b]
                    )
                )
        return b, x, (t_b - t_a, t_c - t_b, time.perf_counter() - t_c)

    def _top_up(self) -> None:
        while len(self.pending) < self.ahead:
            b = next(self.batches, None)
            if b is None:
                return
            self.pending.append(self.pool.submit(self.read_batch, b))

    def __iter__(self) -> Iterator[tuple[list[tuple[int, int]], Any]]:
        """(tile indices (row, column), network input) per batch, in order."""
        self._top_up()
        while self.pending:
            tw = time.perf_counter()
            b, batch_in, times = self.pending.popleft().result()
            self.wait_s += time.perf_counter() - tw
            for key, t in zip(self.split, times, strict=True):
                self.split[key] += t
            self._top_up()
            yield b, batch_in

    def close(self) -> None:
        """Cancel what has not been read and stop the threads."""
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def run_tiled(slide: Slide, model: OnnxModel, opts: RunOptions) -> Prediction:
    """Overlapping-tile inference with overlap averaging; see the module docstring."""
    t0 = time.perf_counter()
    plan = plan_tiles(slide, model.entry, opts)
    choice, xs, ys = plan.choice, plan.xs, plan.ys
    band = BlendBand(slide, model.entry, choice, plan.width_px, plan.height_px, opts.scratch_dir)
    reader = TileReader(slide, model, plan, opts)
    infer_s = 0.0
    bar = _progress(len(plan.jobs), opts.progress_label or slide.path.name, opts.progress)
    try:
        for b, batch_in in reader:
            ti = time.perf_counter()
            ds = choice.downsample
            probs = predict_tiles(model, batch_in, [(round(xs[i] * ds), round(ys[j] * ds)) for j, i in b])
            infer_s += time.perf_counter() - ti
            for (j, i), prob in zip(b, probs):
                band.add(xs[i], ys[j], prob)
            bar.update(len(b))
            raise_if_signalled()
        band.flush(plan.height_px)
    finally:
        reader.close()
        bar.close()
    stats = tiled_stats(plan, model, reader, band, infer_s, time.perf_counter() - t0)
    stats["bad_tiles"] = list(slide.bad_tiles)
    return Prediction(band.mask, choice.downsample, choice.mpp, choice, stats, band.heatmaps, band.prob_sums)


def tiled_stats(
    plan: TilePlan, model: OnnxModel, reader: TileReader, band: BlendBand, infer_s: float, elapsed_s: float
) -> dict[str, Any]:
    """Tile counts and where the time went (the reader threads' parts, summed over threads, overlap the rest)."""
    pw, ph = model.entry.input.patch_size_px
    split = reader.split
    return {
        "tiles_total": len(plan.xs) * len(plan.ys),
        "tiles_run": len(plan.jobs),
        "tile_px": [pw, ph],
        "stride_px": list(plan.stride_px),
        "model_dimensions_px": [plan.width_px, plan.height_px],
        "seconds_total": round(elapsed_s, 3),
        "seconds_premask": round(plan.premask_s, 3),
        "premask_tissue_fraction": None if plan.premask_fraction is None else round(plan.premask_fraction, 5),
        "seconds_read_in_thread": round(sum(split.values()), 3),
        "seconds_inference": round(infer_s, 3),
        "seconds_breakdown": {
            "premask": round(plan.premask_s, 3),
            "read_decode (threads)": round(split["read_decode"], 3),
            "resample (threads)": round(split["resample"], 3),
            "normalise (threads)": round(split["normalise"], 3),
            "inference": round(infer_s, 3),
            "blend": round(band.blend_s, 3),
            "threshold_write": round(band.flush_s, 3),
            "waiting_for_readers": round(reader.wait_s, 3),
        },
    }


def context_tile(
    slide: Slide, choice: LevelChoice, ctx_choice: LevelChoice, spec: ContextInput, cx: float, cy: float
) -> np.ndarray:
    """The (h, w, 3) context tile of ``spec`` centred on (cx, cy) in model pixels at ``choice``; white
    where it reaches beyond the slide."""
    w, h = spec.patch_size_px
    scale = choice.downsample / ctx_choice.downsample  # context pixels per model pixel
    x0, y0 = round(cx * scale - w / 2), round(cy * scale - h / 2)
    cw, ch = model_dimensions(slide, ctx_choice)
    out = np.full((h, w, 3), 255, np.uint8)
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(cw, x0 + w), min(ch, y0 + h)
    if ix1 > ix0 and iy1 > iy0:
        region = read_scaled(slide, ctx_choice, ix0, iy0, ix1 - ix0, iy1 - iy0)
        out[iy0 - y0 : iy0 - y0 + region.shape[0], ix0 - x0 : ix0 - x0 + region.shape[1]] = region[
            : iy1 - iy0, : ix1 - ix0
        ]
    return out


def _bad_boxes(slide: Slide, downsample: float) -> list[tuple[int, int, int, int]]:
    """Skipped bad tiles as (x0, y0, x1, y1) boxes in mask pixels at ``downsample``."""
    return [
        (
            int(b["level0_box_px"][0] // downsample),
            int(b["level0_box_px"][1] // downsample),
            math.ceil(b["level0_box_px"][2] / downsample),
            math.ceil(b["level0_box_px"][3] / downsample),
        )
        for b in slide.bad_tiles
    ]


def run_whole_slide(slide: Slide, model: OnnxModel, opts: RunOptions) -> Prediction:
    """Whole-slide models: the slide's thumbnail resized to the input size, one call."""
    entry = model.entry
    t0 = time.perf_counter()
    thumb, ds = thumbnail(slide, max_side_px=2048)
    pw, ph = entry.input.patch_size_px
    small = np.asarray(Image.fromarray(thumb).resize((pw, ph), Image.Resampling.BILINEAR))
    prob = model.predict(model.preprocess(small[None]))[0]
    th, tw = thumb.shape[:2]
    up = np.stack([np.asarray(Image.fromarray(p).resize((tw, th), Image.Resampling.BILINEAR)) for p in prob])
    labels = labels_from_probabilities(up, entry)
    mask = LabelMask(th, tw)
    mask.write_rows(0, labels)
    heatmaps, prob_sums = {}, {}
    for idx, rows in class_probability_rows(up, entry).items():
        heatmaps[idx] = LabelMask(th, tw)
        heatmaps[idx].write_rows(0, rows)
        prob_sums[idx] = float(rows[labels == idx].sum(dtype=np.int64))
    mpp0, source = slide_base_mpp(slide, opts.slide_mpp, opts.force_slide_mpp)
    choice = LevelChoice(0, 1, mpp0 * ds, ds, source in ("objective power", "assumed default"), mpp0, source)
    stats = {
        "tiles_total": 1,
        "tiles_run": 1,
        "model_dimensions_px": [tw, th],
        "seconds_total": round(time.perf_counter() - t0, 3),
    }
    return Prediction(mask, ds, mpp0 * ds, choice, stats, heatmaps, prob_sums)


def predict_slide(slide: Slide, model: OnnxModel, opts: RunOptions | None = None) -> Prediction:
    """Run ``model`` on ``slide`` according to its registry entry's input mode."""
    opts = opts or RunOptions()
    if model.entry.output.layout == "NC":
        raise ModelInputError(f"{model.entry.id} classifies patches; run it with zoo.kinds.predict")
    if model.entry.input.mode == "whole-slide":
        return run_whole_slide(slide, model, opts)
    return run_tiled(slide, model, opts)

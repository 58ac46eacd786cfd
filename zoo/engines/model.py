"""One network of a registry entry on one engine and precision: normalisation in front, output checks behind.

:class:`OnnxModel` is the object the runner, the model kinds, ``zoo verify`` and the exports hold; which
engine runs it is a name in :data:`zoo.engines.ENGINES`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoo.engines import ENGINES, engine_module
from zoo.engines.common import Engine, LoadOptions, normalisation_table
from zoo.errors import ModelOutputError, ProviderError
from zoo.registry import InputSpec, ModelEntry

#: how far outside [0, 1] a probability may stray (float rounding in the engines' softmax/sigmoid)
PROBABILITY_SLACK = 1e-3


class OnnxModel:
    """A registered ONNX model, run by one of :data:`zoo.engines.ENGINES` at a given precision, checked against
    its entry."""

    #: True when :meth:`preprocess` hands uint8 tiles to an engine that normalises them itself (OpenVINO, torch)
    uint8_input = False

    def __init__(
        self,
        path: Path,
        entry: ModelEntry,
        providers: list[str] | None = None,
        threads: int = 0,
        device: int | None = None,
        engine: str = "onnxruntime",
        precision: str = "fp32",
        batch_size: int = 8,
    ) -> None:
        self.entry = entry
        self.path = path
        self.engine, self.precision = engine, precision
        if engine not in ENGINES:
            raise ProviderError(f"{entry.id}: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        options = LoadOptions(providers, threads, device, precision, batch_size)
        self.runner: Engine = engine_module(engine).load(path, entry, options, self._normalise)
        self.providers = self.runner.providers
        self.fixed_batch = self.runner.fixed_batch
        self.uint8_input = self.runner.uint8_input

    def preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB to the network's input array.

        An engine that normalises inside (OpenVINO, torch: ``uint8_input``) gets the tiles as they are. Otherwise
        RGB/BGR uint8 tiles go through a 256-entry float32 table per channel (the same float32
        arithmetic, done once per grey level: about 5x faster than on every pixel).
        """
        if self.uint8_input and tiles.dtype == np.uint8 and tiles.shape[-1] == 3:
            return np.ascontiguousarray(tiles)  # the engine normalises them
        return self._normalise(tiles)

    def _normalise(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB to the network's float32 input (the registry's scale, mean, std, layout)."""
        spec = self.entry.input
        if tiles.dtype == np.uint8 and spec.channel_order in ("RGB", "BGR") and tiles.shape[-1] == 3:
            lut = self._lut()
            src = [2, 1, 0] if spec.channel_order == "BGR" else [0, 1, 2]
            n, h, w = tiles.shape[:3]
            nchw = spec.layout == "NCHW"
            out = np.empty((n, 3, h, w) if nchw else (n, h, w, 3), np.float32)
            for c, k in enumerate(src):
                np.take(lut[c], tiles[..., k], out=out[:, c] if nchw else out[..., c])
            return out
        return normalise(tiles, spec)

    def _lut(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of each grey level, per network input channel."""
        if getattr(self, "_lut_cache", None) is None:
            self._lut_cache = normalisation_table(self.entry.input)
        return self._lut_cache

    def raw(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """The network's raw output for one input array, or for ``{input name: array}`` (several inputs).

        A network compiled for a fixed batch gets the batch in chunks of that size, the last one padded
        with zeros (each tile's output depends on that tile alone), and the padding's output is dropped.
        """
        if isinstance(x, dict):
            return np.asarray(self.runner.run_feeds(x))
        size = self.fixed_batch
        if not size or x.shape[0] == size:
            return np.asarray(self.runner.run(x))
        parts = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            if chunk.shape[0] < size:
                pad = np.zeros((size - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            parts.append(np.asarray(self.runner.run(chunk))[: min(size, x.shape[0] - start)])
        return np.concatenate(parts)

    def predict_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``{input name: array}`` to (N, C, H, W) float32 class probabilities (multi-input networks)."""
        return to_probabilities(self.runner.run_feeds(feeds), self.entry)

    def predict(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Network input batch (or ``{input name: batch}``) to (N, C, H, W) float32 class probabilities.

        Raises:
            ModelOutputError: see :func:`to_probabilities` (:func:`zoo.runner.predict_tiles` names the tile).
        """
        if isinstance(x, dict):
            return self.predict_feeds(x)
        return to_probabilities(self.raw(x), self.entry)


def normalise(tiles: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W, C) tiles to the network's float32 input: the registry's channel order, scale, mean, std
    and layout, in float32 arithmetic on every pixel (:meth:`OnnxModel.preprocess` uses a table for uint8)."""
    x: np.ndarray = tiles.astype(np.float32)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    elif spec.channel_order == "grey":
        x = x @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    x = (x * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_probabilities(raw: np.ndarray, entry: ModelEntry) -> np.ndarray:
    """The network's raw output to (N, C, H, W) float32 class probabilities (layout, then activation).

    Raises:
        ModelOutputError: the output has the wrong number of channels, or values that are not finite
            or (after the activation) outside [0, 1]; the message names model, stage and the first bad tile.
    """
    y: np.ndarray = np.asarray(raw, dtype=np.float32)
    out = entry.output
    if out.layout == "NC":  # one vector per patch: a 1x1 map
        y = y.reshape(y.shape[0], -1, 1, 1)
    if out.layout == "NHWC":
        y = y.transpose(0, 3, 1, 2)
    if not out.already_activated:
        if out.activation == "sigmoid":
            y = 1.0 / (1.0 + np.exp(-y))
        elif out.activation == "softmax":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
    who = entry.id if entry.stage_name == "main" else f"{entry.id} stage {entry.stage_name!r}"
    if y.ndim != 4 or y.shape[1] != out.channels:
        raise ModelOutputError(
            f"{who}: the network returned shape {list(np.shape(raw))}, not {out.channels} channel(s) in "
            f"{out.layout}; fix output.channels/layout in the registry or re-export the model"
        )
    finite = np.isfinite(y).all(axis=(1, 2, 3))
    lo, hi = -PROBABILITY_SLACK, 1 + PROBABILITY_SLACK
    in_range = (
        finite if out.activation == "none" else finite & (y.min(axis=(1, 2, 3)) >= lo) & (y.max(axis=(1, 2, 3)) <= hi)
    )
    if not in_range.all():
        k = int(np.flatnonzero(~in_range)[0])
        where = "the whole image" if len(y) == 1 else f"input {k} of the batch"
        bad = y[k]
        what = (
            f"{int((~np.isfinite(bad)).sum())} non-finite value(s) (NaN/Inf)"
            if not finite[k]
            else f"values {float(bad.min()):.4g}..{float(bad.max()):.4g}, outside [0, 1] after {out.activation!r}"
        )
        raise ModelOutputError(
            f"{who}: {what} at {where} ({int((~in_range).sum())} of {len(y)} in the batch); the weights are "
            "broken or output.activation/already_activated is wrong: restore the model or fix its entry",
            batch_index=k,
            where=where,
        )
    return y

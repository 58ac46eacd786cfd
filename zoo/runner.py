"""Run a registered ONNX model over a slide, streaming, in bounded memory.

The only module that imports inference engines (onnxruntime; OpenVINO and torch, through
:mod:`zoo.onnx_torch`, when asked for). Steps: choose the level (and an extra
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
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import ndimage as ndi

from zoo.errors import ModelInputError, ModelOutputError, ProviderError, raise_if_signalled
from zoo.labelmask import UNKNOWN_LABEL, LabelMask
from zoo.registry import ContextInput, InputSpec, ModelEntry
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
        batch_size: tiles per ONNX Runtime call.
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
    batch_size: int = 8
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


#: How to get each execution provider that a plain ``pip install`` lacks.
PROVIDER_HINTS = {
    "CUDAExecutionProvider": "pip uninstall -y onnxruntime && pip install '.[gpu]', with an NVIDIA driver and CUDA 12",
    "TensorrtExecutionProvider": "pip install '.[gpu]' and TensorRT",
}


def check_providers(providers: list[str]) -> None:
    """Refuse providers this onnxruntime build or machine does not have (no silent CPU fallback).

    Raises:
        ProviderError: naming the missing providers, those available, and how to get them.
    """
    avail = ort.get_available_providers()
    missing = [p for p in providers if p not in avail]
    if missing:
        how = "; ".join(f"{p}: {PROVIDER_HINTS[p]}" for p in missing if p in PROVIDER_HINTS)
        raise ProviderError(
            f"--providers {' '.join(missing)}: not available in this onnxruntime (available: {', '.join(avail)})"
            + (f"; to get it: {how}" if how else "; check the name (see onnxruntime.get_available_providers())")
        )


def default_providers() -> list[str]:
    """CUDA (when this onnxruntime build and machine have it), then CPU."""
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def cpu_flags() -> set[str]:
    """The instruction-set flags the CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: Precisions with hardware support for their matrix arithmetic, by CPU flag (any of them).
PRECISION_CPU_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (checked without importing torch or CUDA libraries)."""
    return Path("/proc/driver/nvidia/version").exists()


def torch_device(device: int | None = None) -> str:
    """The device the torch engine runs on: ``cuda:N`` when torch sees a CUDA GPU, else ``cpu``."""
    if not nvidia_driver_present():
        return "cpu"
    import torch

    return f"cuda:{device or 0}" if torch.cuda.is_available() else "cpu"


def engine_unavailable(engine: str, precision: str = "fp32", device: int | None = None) -> str | None:
    """Why ``engine`` cannot run ``precision`` on this machine, or None when it can."""
    if engine == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install '.[openvino]')"
    elif engine == "torch":
        try:
            import torch
        except ImportError:
            return "torch is not installed (pip install '.[torch]')"
        where = torch_device(device)
        if where.startswith("cuda"):
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                return f"this GPU ({torch.cuda.get_device_name(where)}) has no bf16 arithmetic"
            return None if precision in ("fp32", "fp16", "bf16") else f"the torch engine does not run {precision}"
        if precision not in ("fp32", "bf16"):
            return f"the torch engine runs {precision} on CUDA GPUs only, and none is present"
    elif engine != "onnxruntime":
        return f"unknown engine {engine!r} (onnxruntime, openvino or torch)"
    elif precision != "fp32":
        return f"the onnxruntime engine runs the registered model in fp32 only, not {precision}"
    flags = PRECISION_CPU_FLAGS.get(precision)
    if flags and not cpu_flags() & set(flags):
        return f"this CPU has no {precision} arithmetic ({' or '.join(flags)} not in /proc/cpuinfo)"
    return None


#: zoo precision names to OpenVINO element types (INFERENCE_PRECISION_HINT)
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def ov_uint8_input(model: Any, spec: InputSpec) -> Any:
    """An OpenVINO model taking (N, H, W, 3) uint8 RGB tiles and normalising them as ``spec`` says:
    ``(value * scale - mean) / std`` per channel, BGR order and NCHW layout where the network wants them."""
    from openvino import Layout, Type
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    ppp.input().model().set_layout(Layout(spec.layout))
    steps = ppp.input().preprocess()
    if spec.channel_order == "BGR":
        steps.reverse_channels()
    steps.convert_element_type(Type.f32).scale(1.0 / spec.scale).mean(list(spec.mean)).scale(list(spec.std))
    return ppp.build()


class OnnxModel:
    """A registered ONNX model, run by ONNX Runtime, OpenVINO or torch at a given precision, checked against its entry.

    OpenVINO is always given its precision explicitly (left to itself it picks bf16 on CPUs that
    have it); ONNX Runtime runs the model as exported (fp32).
    """

    #: True when :meth:`preprocess` hands uint8 tiles to an engine that normalises them itself (OpenVINO).
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
        if engine == "openvino":
            self._init_openvino(path, threads, precision, batch_size)
            return
        if engine == "torch":
            self._init_torch(path, threads, device, precision)
            return
        if precision != "fp32":
            raise ProviderError(
                f"{entry.id}: the onnxruntime engine runs fp32 only; use --engine openvino for {precision}"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        self.entry = entry
        self.path = path
        if device is not None:
            check_providers(["CUDAExecutionProvider"])
            chosen: list[Any] = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        else:
            if providers:
                check_providers(providers)
            chosen = list(providers or default_providers())
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelInputError(f"{path}: ONNX Runtime cannot load {entry.id} ({err}); re-export the model") from err
        self.providers = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        spec_in, spec_out = entry.input, entry.output
        if spec_in.input_name not in inputs:
            raise ModelInputError(
                f"{path}: {entry.id} has no input {spec_in.input_name!r} (it has {sorted(inputs)}); "
                "fix input.input_name"
            )
        if spec_out.output_name not in outputs:
            raise ModelInputError(
                f"{path}: {entry.id} has no output {spec_out.output_name!r} (it has {sorted(outputs)}); "
                "fix output.output_name"
            )
        shape = inputs[spec_in.input_name].shape
        w, h = spec_in.patch_size_px
        expect = [None, spec_in.channels, h, w] if spec_in.layout == "NCHW" else [None, h, w, spec_in.channels]
        for got, want in zip(shape[1:], expect[1:]):
            if isinstance(got, int) and got != want:
                raise ModelInputError(
                    f"{path}: {entry.id} input shape {shape} does not match the registry's {spec_in.layout} "
                    f"{expect}; fix input.patch_size_px/channels/layout"
                )
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        out_name, in_name = spec_out.output_name, spec_in.input_name
        self._raw = lambda x: self.session.run([out_name], {in_name: x})[0]
        self._feeds = lambda feeds: self.session.run([out_name], feeds)[0]

    def _init_openvino(self, path: Path, threads: int, precision: str, batch_size: int) -> None:
        """Compile the ONNX file with OpenVINO on the CPU at ``precision`` (set explicitly, never left to default).

        Three things make it faster without changing what is computed (``zoo verify`` checks the result):
        exported GroupNorms are rewritten so they need no layout reorders
        (:func:`zoo.onnx_rewrite.group_norm_channels_last`); a single-input network is compiled for a
        static batch of ``batch_size`` tiles (a shorter batch is padded, a longer one split); and an RGB/BGR
        network takes the (N, H, W, 3) uint8 tiles as they are, normalised inside OpenVINO, so the reader
        thread no longer converts them. On ``tissue-multires`` in bf16 the first two give 1.3x the tiles
        per second of the as-exported, dynamic-shape graph.
        """
        reason = engine_unavailable("openvino", precision)
        if reason:
            raise ProviderError(f"{self.entry.id}: cannot run on OpenVINO at {precision}: {reason}")
        import onnx
        import openvino as ov

        from zoo.onnx_rewrite import group_norm_channels_last

        core = ov.Core()
        spec = self.entry.input
        config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads or (os.cpu_count() or 1),
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            proto, n_norms = group_norm_channels_last(onnx.load(str(path)))
            model = core.read_model(model=proto.SerializeToString(), weights=ov.Tensor(np.empty(0, np.uint8)))
            if spec.mode == "whole-slide":
                batch_size = 1  # one image per slide
            single = len(model.inputs) == 1
            static = single and batch_size > 0 and model.inputs[0].get_partial_shape()[0].is_dynamic
            if static:
                w, h = spec.patch_size_px
                hw = [spec.channels, h, w] if spec.layout == "NCHW" else [h, w, spec.channels]
                model.reshape({model.inputs[0].get_any_name(): [batch_size, *hw]})
            self.uint8_input = single and spec.channel_order in ("RGB", "BGR") and spec.channels == 3
            float_model = model.clone() if self.uint8_input else model
            compiled = core.compile_model(ov_uint8_input(model, spec) if self.uint8_input else model, "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelInputError(
                f"{path}: OpenVINO cannot compile {self.entry.id} ({err}); re-export the model"
            ) from err
        self._check_io_names(
            path,
            {n for i in compiled.inputs for n in i.get_names()},
            {n for o in compiled.outputs for n in o.get_names()},
        )
        request = compiled.create_infer_request()
        out_name, in_name = self.entry.output.output_name, spec.input_name
        out_port = compiled.output(out_name)
        float_request: list[Any] = []  # compiled on first use: network-format input the tiles cannot be recovered from

        def run(x: np.ndarray) -> np.ndarray:
            if not self.uint8_input:
                return np.asarray(request.infer({in_name: x})[out_port])
            tiles = x if x.dtype == np.uint8 else self._uint8_tiles(x)
            if tiles is not None:
                return np.asarray(request.infer({in_name: tiles})[out_port])
            if not float_request:
                fc = core.compile_model(float_model, "CPU", config)
                float_request[:] = [fc.create_infer_request(), fc.output(out_name)]
            return np.asarray(float_request[0].infer({in_name: x})[float_request[1]])

        notes = [f"{n_norms} GroupNorms channels-last"] if n_norms else []
        notes += [f"static batch {batch_size}"] if static else []
        notes += ["uint8 tiles normalised in OpenVINO"] if self.uint8_input else []
        self.providers = [f"OpenVINO CPU {precision}" + (f" ({'; '.join(notes)})" if notes else "")]
        self.fixed_batch = batch_size if static else None
        self._raw = run
        self._feeds = lambda feeds: request.infer(feeds)[out_port]

    def _uint8_tiles(self, x: np.ndarray) -> np.ndarray | None:
        """Network-format float input back to the (N, H, W, 3) uint8 tiles it was made from, or None if it
        was not made by :meth:`preprocess` from uint8 tiles (then it is run as it is)."""
        spec = self.entry.input
        nhwc = x.transpose(0, 2, 3, 1) if spec.layout == "NCHW" else x
        if x.ndim != 4 or nhwc.shape[-1] != 3:
            return None
        rgb = nhwc[..., ::-1] if spec.channel_order == "BGR" else nhwc
        levels = np.rint((rgb * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)) / spec.scale)
        if levels.min() < 0 or levels.max() > 255:
            return None
        tiles = np.ascontiguousarray(levels, dtype=np.uint8)
        return tiles if np.allclose(self._normalise(tiles), x, rtol=0, atol=1e-6) else None

    def _check_io_names(self, path: Path, inputs: set[str], outputs: set[str]) -> None:
        """Refuse a network without the entry's input and output names (OpenVINO and torch engines)."""
        if self.entry.input.input_name not in inputs or self.entry.output.output_name not in outputs:
            raise ModelInputError(
                f"{path}: {self.entry.id} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; fix "
                "input.input_name/output.output_name"
            )

    def _init_torch(self, path: Path, threads: int, device: int | None, precision: str) -> None:
        """Load the ONNX file as a torch module (:mod:`zoo.onnx_torch`) on the GPU if torch sees one, else the CPU.

        fp32 is true fp32 (TF32 off); fp16/bf16 run under autocast, which keeps normalisations in fp32.
        """
        reason = engine_unavailable("torch", precision, device)
        if reason:
            raise ProviderError(f"{self.entry.id}: cannot run on torch at {precision}: {reason}")
        import torch

        from zoo.onnx_torch import load_graph

        where = torch_device(device)
        graph = load_graph(str(path), f"{path} ({self.entry.id})")
        self._check_io_names(path, set(graph.input_names), set(graph.output_names))
        dev = torch.device(where)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles have one size: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            name = torch.cuda.get_device_name(dev)
        else:
            torch.set_num_threads(threads or (os.cpu_count() or 1))
            name = "CPU"
        graph = graph.to(dev)
        out_index = graph.output_names.index(self.entry.output.output_name)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

        def run(*arrays: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                ins = [torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True) for a in arrays]
                out = graph(*ins)[out_index]
                return np.asarray(out.float().cpu().numpy())

        self.providers = [f"torch {where} ({name}) {precision}"]
        self.fixed_batch = None
        self._raw = run
        self._feeds = lambda feeds: run(*(feeds[n] for n in graph.input_names))

    def preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB to the network's input array.

        An engine that normalises inside (OpenVINO, ``uint8_input``) gets the tiles as they are. Otherwise
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
        x: np.ndarray = tiles.astype(np.float32)
        if spec.channel_order == "BGR":
            x = x[..., ::-1]
        elif spec.channel_order == "grey":
            x = x @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
        x = (x * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        if spec.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _lut(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of each grey level, per network input channel."""
        if getattr(self, "_lut_cache", None) is None:
            spec = self.entry.input
            levels = np.arange(256, dtype=np.float32)[:, None]
            table = (levels * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
            self._lut_cache = np.ascontiguousarray(table.T, dtype=np.float32)
        return self._lut_cache

    def raw(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """The network's raw output for one input array, or for ``{input name: array}`` (several inputs).

        A network compiled for a fixed batch gets the batch in chunks of that size, the last one padded
        with zeros (each tile's output depends on that tile alone), and the padding's output is dropped.
        """
        if isinstance(x, dict):
            return np.asarray(self._feeds(x))
        size = self.fixed_batch
        if not size or x.shape[0] == size:
            return np.asarray(self._raw(x))
        parts = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            if chunk.shape[0] < size:
                pad = np.zeros((size - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            parts.append(np.asarray(self._raw(chunk))[: min(size, x.shape[0] - start)])
        return np.concatenate(parts)

    def predict_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``{input name: array}`` to (N, C, H, W) float32 class probabilities (multi-input networks)."""
        return to_probabilities(self._feeds(feeds), self.entry)

    def predict(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Network input batch (or ``{input name: batch}``) to (N, C, H, W) float32 class probabilities.

        Raises:
            ModelOutputError: see :func:`to_probabilities` (:func:`predict_tiles` names the tile).
        """
        if isinstance(x, dict):
            return self.predict_feeds(x)
        return to_probabilities(self.raw(x), self.entry)


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


#: how far outside [0, 1] a probability may stray (float rounding in the engines' softmax/sigmoid)
PROBABILITY_SLACK = 1e-3


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
    """(C, H, W) probabilities to (H, W) uint8 class indices of ``entry``'s classes."""
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
    return idx[prob.argmax(axis=0)]


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


def run_tiled(slide: Slide, model: OnnxModel, opts: RunOptions) -> Prediction:
    """Overlapping-tile inference with overlap averaging; see the module docstring."""
    entry = model.entry
    t0 = time.perf_counter()
    plan = plan_tiles(slide, entry, opts)
    choice, width, height, xs, ys, jobs = plan.choice, plan.width_px, plan.height_px, plan.xs, plan.ys, plan.jobs
    pw, ph = entry.input.patch_size_px
    n_cls = entry.output.channels

    mask = LabelMask(height, width, opts.scratch_dir)
    heatmaps = {c.index: LabelMask(height, width, opts.scratch_dir, counted=False) for c in entry.foreground}
    prob_sums = dict.fromkeys(heatmaps, 0.0)
    acc = np.zeros((n_cls, ph, width + pw), np.float32)  # band: rows [band_y, band_y + ph)
    cnt = np.zeros((ph, width + pw), np.float32)
    band_y = 0

    def flush(until_y: int) -> None:
        """Finalise mask rows [band_y, until_y) and slide the band down (at most one band per step)."""
        nonlocal band_y
        until_y = min(until_y, height)
        while band_y < until_y:
            n = min(until_y - band_y, ph)
            c = cnt[:n, :width]
            prob = acc[:, :n, :width] / np.maximum(c, 1e-6)
            lab = labels_from_probabilities(prob, entry)
            glass = c == 0  # never inferred (background skipped)
            lab[glass] = 0
            for x0, y0, x1, y1 in _bad_boxes(slide, choice.downsample):  # --on-bad-tile skip: unknown
                r0, r1 = max(y0, band_y) - band_y, min(y1, band_y + n) - band_y
                if r1 > r0:
                    lab[r0:r1, max(0, x0) : max(0, x1)] = UNKNOWN_LABEL
            mask.write_rows(band_y, lab)
            for idx, rows in class_probability_rows(prob, entry).items():
                rows[glass] = 0
                heatmaps[idx].write_rows(band_y, rows)
                prob_sums[idx] += float(rows[lab == idx].sum(dtype=np.int64))
            acc[:, : ph - n] = acc[:, n:].copy()
            acc[:, ph - n :] = 0
            cnt[: ph - n] = cnt[n:].copy()
            cnt[ph - n :] = 0
            band_y += n

    contexts = [
        (
            c,
            choose_level(
                slide, target_mpp=c.target_mpp, slide_mpp=opts.slide_mpp, force_slide_mpp=opts.force_slide_mpp
            ),
        )
        for c in entry.context_inputs
    ]
    bs = max(1, opts.batch_size)
    batches = iter([jobs[k : k + bs] for k in range(0, len(jobs), bs)])
    n_readers = max(1, opts.reader_threads)
    ahead = max(1, opts.prefetch_batches) + n_readers - 1
    split = {"read_decode": 0.0, "resample": 0.0, "normalise": 0.0}

    def read_batch(b: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], Any, tuple[float, float, float]]:
        """One batch of tiles as the network's input (on a reader thread), with the seconds of each step."""
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
        if contexts:  # multi-input models: centred context tiles, one ONNX input each
            x = {entry.input.input_name: x}
            for spec, ctx_choice in contexts:
                x[spec.input_name] = model.preprocess(
                    np.stack(
                        [context_tile(slide, choice, ctx_choice, spec, xs[i] + pw / 2, ys[j] + ph / 2) for j, i in b]
                    )
                )
        return b, x, (t_b - t_a, t_c - t_b, time.perf_counter() - t_c)

    # batches are read ahead on ``n_readers`` threads and consumed in order (the band slides down row by row)
    pool = ThreadPoolExecutor(max_workers=n_readers, thread_name_prefix="tile-reader")
    pending: deque[Future[Any]] = deque()

    def top_up() -> None:
        while len(pending) < ahead:
            b = next(batches, None)
            if b is None:
                return
            pending.append(pool.submit(read_batch, b))

    infer_s = wait_s = blend_s = flush_s = 0.0
    bar = _progress(len(jobs), opts.progress_label or slide.path.name, opts.progress)
    try:
        top_up()
        while pending:
            tw = time.perf_counter()
            b, batch_in, (t_read, t_resample, t_norm) = pending.popleft().result()
            wait_s += time.perf_counter() - tw
            split["read_decode"] += t_read
            split["resample"] += t_resample
            split["normalise"] += t_norm
            top_up()
            ti = time.perf_counter()
            ds = choice.downsample
            probs = predict_tiles(model, batch_in, [(round(xs[i] * ds), round(ys[j] * ds)) for j, i in b])
            infer_s += time.perf_counter() - ti
            for (j, i), prob in zip(b, probs):
                ty, tx = ys[j], xs[i]
                if ty > band_y:
                    tf = time.perf_counter()
                    flush(ty)
                    flush_s += time.perf_counter() - tf
                tb = time.perf_counter()
                r = ty - band_y
                acc[:, r : r + ph, tx : tx + pw] += prob
                cnt[r : r + ph, tx : tx + pw] += 1
                blend_s += time.perf_counter() - tb
            bar.update(len(b))
            raise_if_signalled()
        tf = time.perf_counter()
        flush(height)
        flush_s += time.perf_counter() - tf
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    read_s = sum(split.values())
    elapsed = time.perf_counter() - t0
    stats = {
        "tiles_total": len(xs) * len(ys),
        "tiles_run": len(jobs),
        "tile_px": [pw, ph],
        "stride_px": list(plan.stride_px),
        "model_dimensions_px": [width, height],
        "seconds_total": round(elapsed, 3),
        "seconds_premask": round(plan.premask_s, 3),
        "premask_tissue_fraction": None if plan.premask_fraction is None else round(plan.premask_fraction, 5),
        "seconds_read_in_thread": round(read_s, 3),
        "seconds_inference": round(infer_s, 3),
        # where the time goes: the reader threads' parts (summed over threads) overlap the consumer's
        "seconds_breakdown": {
            "premask": round(plan.premask_s, 3),
            "read_decode (threads)": round(split["read_decode"], 3),
            "resample (threads)": round(split["resample"], 3),
            "normalise (threads)": round(split["normalise"], 3),
            "inference": round(infer_s, 3),
            "blend": round(blend_s, 3),
            "threshold_write": round(flush_s, 3),
            "waiting_for_readers": round(wait_s, 3),
        },
        "bad_tiles": list(slide.bad_tiles),
    }
    return Prediction(mask, choice.downsample, choice.mpp, choice, stats, heatmaps, prob_sums)


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

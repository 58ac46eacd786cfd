"""The ``openvino`` engine: the pinned ONNX file compiled by OpenVINO on the CPU at fp32, bf16 or fp16 (int8: the
quantised file).

OpenVINO is always given its precision explicitly (left to itself it picks bf16 on CPUs that have it).
Three things make it faster without changing what is computed (``zoo verify`` checks the result):
exported GroupNorms are rewritten so they need no layout reorders
(:func:`zoo.engines.openvino_rewrite.group_norm_channels_last`); a single-input network is compiled for a
static batch of ``batch_size`` tiles (a shorter batch is padded, a longer one split); and an RGB/BGR
network takes the (N, H, W, 3) uint8 tiles as they are, normalised inside OpenVINO, so the reader
thread no longer converts them. On ``tissue-multires`` in bf16 the first two give 1.3x the tiles
per second of the as-exported, dynamic-shape graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from zoo.engines.common import LoadOptions, Normaliser, check_io_names, cpu_lacks
from zoo.errors import ModelInputError, ProviderError
from zoo.registry import InputSpec, ModelEntry

#: zoo precision names to OpenVINO element types (INFERENCE_PRECISION_HINT); int8 runs its quantised file,
#: whose QuantizeLinear/DequantizeLinear pairs OpenVINO turns into int8 convolutions, the rest in f32
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def unavailable(precision: str, device: int | None = None) -> str | None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install '.[openvino]')"
    return cpu_lacks(precision)


def read_network(core: Any, path: Path, self_contained: bool) -> tuple[Any, int]:
    """``path`` as an OpenVINO model with its exported GroupNorms made layout-free
    (:func:`zoo.engines.openvino_rewrite.group_norm_channels_last`), and how many were rewritten.

    What the rewrite made of a self-contained file (no external data) is remembered in the check cache
    (:func:`zoo.registry.check_cache_dir`) under the file's sha256 and zoo's version: the count, and the
    rewritten graph with its own sha256 where there was something to rewrite. A later run then reads it
    without importing onnx (~0.5 s)."""
    import hashlib

    import openvino as ov

    from zoo import __version__
    from zoo.errors import OutputError
    from zoo.outputs import atomic_path
    from zoo.registry import check_cache_dir, remember_pass, remembered, sha256_file

    folder = check_cache_dir() if self_contained else None
    name = ""
    if folder is not None:
        key = f"{sha256_file(path)}\nopenvino group-norm rewrite\n{__version__}"
        name = "openvino-" + hashlib.sha256(key.encode()).hexdigest()
        info = remembered(name)
        try:
            if info is not None and info["groupnorms"] == 0:
                return core.read_model(str(path)), 0
            rewritten = folder / f"{name}.onnx"
            if info is not None and sha256_file(rewritten) == info["sha256"]:
                return core.read_model(str(rewritten)), int(info["groupnorms"])
        except (OSError, KeyError, TypeError, ValueError):
            pass  # missing or changed: rewrite again
    import onnx

    from zoo.engines.openvino_rewrite import group_norm_channels_last

    proto, n = group_norm_channels_last(onnx.load(str(path)))
    data = proto.SerializeToString()
    model = core.read_model(model=data, weights=ov.Tensor(np.empty(0, np.uint8)))
    if folder is not None:
        detail: dict[str, Any] = {"groupnorms": n, "file": str(path)}
        if n:
            try:
                with atomic_path(folder / f"{name}.onnx") as tmp:
                    tmp.write_bytes(data)
            except OutputError:
                return model, n  # a read-only home: rewritten again next time
            detail["sha256"] = hashlib.sha256(data).hexdigest()
        remember_pass(name, detail)
    return model, n


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


class OpenVinoEngine:
    """A network compiled by OpenVINO for the CPU (see the module docstring)."""

    def __init__(self, path: Path, entry: ModelEntry, options: LoadOptions, normalise: Normaliser) -> None:
        precision, batch_size = options.precision, options.batch_size
        reason = unavailable(precision)
        if reason:
            raise ProviderError(f"{entry.id}: cannot run on OpenVINO at {precision}: {reason}")
        import openvino as ov

        self.entry, self._normalise = entry, normalise
        core = ov.Core()
        spec = entry.input
        config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": options.threads or (os.cpu_count() or 1),
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            model, n_norms = read_network(core, path, not entry.weights_for(precision).files)
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
            raise ModelInputError(f"{path}: OpenVINO cannot compile {entry.id} ({err}); re-export the model") from err
        check_io_names(
            path,
            entry,
            {n for i in compiled.inputs for n in i.get_names()},
            {n for o in compiled.outputs for n in o.get_names()},
        )
        self._request = compiled.create_infer_request()
        self._in, self._out_name = spec.input_name, entry.output.output_name
        self._out = compiled.output(self._out_name)
        self._core, self._config, self._float_model = core, config, float_model
        self._float_request: list[Any] = []  # compiled on first use: float input no uint8 tiles can be recovered from
        notes = [f"{n_norms} GroupNorms channels-last"] if n_norms else []
        notes += [f"static batch {batch_size}"] if static else []
        notes += ["uint8 tiles normalised in OpenVINO"] if self.uint8_input else []
        self.providers = [f"OpenVINO CPU {precision}" + (f" ({'; '.join(notes)})" if notes else "")]
        self.fixed_batch = batch_size if static else None

    def run(self, x: np.ndarray) -> np.ndarray:
        if not self.uint8_input:
            return np.asarray(self._request.infer({self._in: x})[self._out])
        tiles = x if x.dtype == np.uint8 else self._uint8_tiles(x)
        if tiles is not None:
            return np.asarray(self._request.infer({self._in: tiles})[self._out])
        if not self._float_request:
            fc = self._core.compile_model(self._float_model, "CPU", self._config)
            self._float_request[:] = [fc.create_infer_request(), fc.output(self._out_name)]
        return np.asarray(self._float_request[0].infer({self._in: x})[self._float_request[1]])

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._request.infer(feeds)[self._out])

    def _uint8_tiles(self, x: np.ndarray) -> np.ndarray | None:
        """Network-format float input back to the (N, H, W, 3) uint8 tiles it was made from, or None if it
        was not made by the normaliser from uint8 tiles (then it is run as it is)."""
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


def load(path: Path, entry: ModelEntry, options: LoadOptions, normalise: Normaliser) -> OpenVinoEngine:
    """``path`` compiled by OpenVINO on the CPU at ``options.precision``."""
    return OpenVinoEngine(path, entry, options, normalise)

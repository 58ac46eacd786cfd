"""The ``torch`` engine: the pinned ONNX graph run by torch operators (:mod:`zoo.engines.torch_graph`), on a
CUDA GPU when torch sees one, else on the CPU.

fp32 is true fp32 (TF32 off); fp16/bf16 run under autocast, which keeps normalisations in fp32. A network
with one RGB/BGR input takes the uint8 tiles (``uint8_input``): they are copied to the device as they are (a
quarter of float32's bytes) and normalised there by the same 256-entry float32 table per channel as
:meth:`zoo.engines.model.OnnxModel.preprocess` uses on the host, so the network sees the very same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zoo.engines.common import (
    LoadOptions,
    Normaliser,
    check_io_names,
    cpu_lacks,
    normalisation_table,
    nvidia_driver_present,
)
from zoo.errors import ProviderError
from zoo.registry import ModelEntry


def torch_device(device: int | None = None) -> str:
    """The device the torch engine runs on: ``cuda:N`` when torch sees a CUDA GPU, else ``cpu``."""
    if not nvidia_driver_present():
        return "cpu"
    import torch

    return f"cuda:{device or 0}" if torch.cuda.is_available() else "cpu"


def unavailable(precision: str, device: int | None = None) -> str | None:
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
    return cpu_lacks(precision)


class TorchEngine:
    """The ONNX graph as a torch module on one device (see the module docstring)."""

    fixed_batch = None

    def __init__(self, path: Path, entry: ModelEntry, options: LoadOptions) -> None:
        precision, device = options.precision, options.device
        reason = unavailable(precision, device)
        if reason:
            raise ProviderError(f"{entry.id}: cannot run on torch at {precision}: {reason}")
        import torch

        from zoo.engines.torch_graph import load_graph

        where = torch_device(device)
        graph = load_graph(str(path), f"{path} ({entry.id})")
        check_io_names(path, entry, set(graph.input_names), set(graph.output_names))
        dev = torch.device(where)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # tiles have one size: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            name = torch.cuda.get_device_name(dev)
        else:
            torch.set_num_threads(options.threads or (os.cpu_count() or 1))
            name = "CPU"
        self._graph = graph.to(dev)
        self._dev = dev
        self._out_index = graph.output_names.index(entry.output.output_name)
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        spec = entry.input
        #: True: run() takes (N, H, W, 3) uint8 tiles and normalises them on the device
        self.uint8_input = len(graph.input_names) == 1 and spec.channel_order in ("RGB", "BGR") and spec.channels == 3
        self._lut = torch.from_numpy(normalisation_table(spec)).to(dev)
        self._src = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
        self._nchw = spec.layout == "NCHW"
        notes = " (uint8 tiles normalised on the device)" if self.uint8_input else ""
        self.providers = [f"torch {where} ({name}) {precision}{notes}"]

    def _on_device(self, a: np.ndarray) -> object:
        """One input array on the device: uint8 tiles (with ``uint8_input``) normalised there, else as it is."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self._dev, non_blocking=True)
        if not (self.uint8_input and a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] == 3):
            return t
        n, h, w, _ = a.shape
        out = torch.empty((n, 3, h, w) if self._nchw else (n, h, w, 3), dtype=torch.float32, device=self._dev)
        for c, k in enumerate(self._src):
            plane = self._lut[c][t[..., k].long()]  # the table's float32 value of each grey level
            if self._nchw:
                out[:, c] = plane
            else:
                out[..., c] = plane
        return out

    def _run(self, *arrays: np.ndarray) -> np.ndarray:
        import torch

        dtype = self._dtype
        with torch.inference_mode(), torch.autocast(self._dev.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
            ins = [self._on_device(a) for a in arrays]
            out = self._graph(*ins)[self._out_index]
            return np.asarray(out.float().cpu().numpy())

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(*(feeds[n] for n in self._graph.input_names))


def load(path: Path, entry: ModelEntry, options: LoadOptions, normalise: Normaliser) -> TorchEngine:
    """``path`` as a torch module (``normalise`` is not needed: the engine takes float input)."""
    return TorchEngine(path, entry, options)

"""The ``onnxruntime`` engine: the pinned ONNX file as exported, fp32, on the CPU or ONNX Runtime's CUDA provider."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from zoo.engines.common import LoadOptions, Normaliser, cpu_lacks
from zoo.errors import ModelInputError, ProviderError
from zoo.registry import ModelEntry

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


def unavailable(precision: str, device: int | None = None) -> str | None:
    """ONNX Runtime runs the registered files as they are: fp32, and int8's quantised copy where the CPU has
    VNNI (without it, its uint8 x int8 kernels can saturate)."""
    if precision == "int8":
        return "int8 runs on the CPU here, not on a GPU" if device is not None else cpu_lacks(precision)
    if precision != "fp32":
        return f"the onnxruntime engine runs the registered files as they are (fp32, int8), not {precision}"
    return None


class OrtEngine:
    """An ONNX Runtime session (graph optimisation "all", sequential, spinning threads)."""

    uint8_input = False

    def __init__(self, path: Path, entry: ModelEntry, options: LoadOptions) -> None:
        reason = unavailable(options.precision, options.device)
        if reason:
            raise ProviderError(f"{entry.id}: {reason}; use --engine openvino for {options.precision}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = options.threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        # a whole-slide network runs once per slide: the arena would keep its peak (and round it up) for nothing;
        # tumour-h2g's 1024 px refinement: 873 vs 1,576 MB peak (python benchmarks/bench_whole_slide_memory.py)
        so.enable_cpu_mem_arena = entry.input.mode != "whole-slide"
        if options.device is not None:
            check_providers(["CUDAExecutionProvider"])
            chosen: list[Any] = [("CUDAExecutionProvider", {"device_id": options.device}), "CPUExecutionProvider"]
        else:
            if options.providers:
                check_providers(options.providers)
            chosen = list(options.providers or default_providers())
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
        self._out, self._in = spec_out.output_name, spec_in.input_name

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self._out], {self._in: x})[0])

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run([self._out], feeds)[0])


def load(path: Path, entry: ModelEntry, options: LoadOptions, normalise: Normaliser) -> OrtEngine:
    """An ONNX Runtime session of ``path`` (``normalise`` is not needed: ONNX Runtime takes float input)."""
    return OrtEngine(path, entry, options)

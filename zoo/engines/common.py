"""What the engine modules share: the interface they return, load options, CPU capabilities, checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from zoo.errors import ModelInputError
from zoo.registry import InputSpec, ModelEntry

#: Precisions with hardware support for their matrix arithmetic, by CPU flag (any of them).
PRECISION_CPU_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}

#: (N, H, W, 3) uint8 tiles to the network's float32 input (the registry's scale, mean, std, layout)
Normaliser = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LoadOptions:
    """How to load a network: ONNX Runtime providers, CPU threads (0: all), GPU index, precision, and the
    static batch an engine may compile for (0: dynamic)."""

    providers: list[str] | None = None
    threads: int = 0
    device: int | None = None
    precision: str = "fp32"
    batch_size: int = 8


class Engine(Protocol):
    """A loaded network on one engine (what an engine module's ``load`` returns)."""

    #: what ran it, for run.json (execution providers, device, precision, graph changes)
    providers: list[str]
    #: the batch the network was compiled for (inputs are cut and padded to it), or None
    fixed_batch: int | None
    #: True when the engine takes (N, H, W, 3) uint8 tiles and normalises them itself
    uint8_input: bool

    def run(self, x: np.ndarray) -> np.ndarray:
        """The raw output for one input array (the network's format, or uint8 tiles with ``uint8_input``)."""
        ...

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The raw output for ``{input name: array}`` (multi-input networks)."""
        ...


def normalisation_table(spec: InputSpec) -> np.ndarray:
    """(3, 256) float32: the normalised value of each grey level, per network input channel (the registry's
    scale, mean and std in float32), so that normalising a uint8 tile is a table lookup."""
    levels = np.arange(256, dtype=np.float32)[:, None]
    table = (levels * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(table.T, dtype=np.float32)


def cpu_flags() -> set[str]:
    """The instruction-set flags the CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_lacks(precision: str) -> str | None:
    """Why this CPU cannot do ``precision``'s arithmetic in hardware, or None."""
    flags = PRECISION_CPU_FLAGS.get(precision)
    if flags and not cpu_flags() & set(flags):
        return f"this CPU has no {precision} arithmetic ({' or '.join(flags)} not in /proc/cpuinfo)"
    return None


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded (checked without importing torch or CUDA libraries)."""
    return Path("/proc/driver/nvidia/version").exists()


def check_io_names(path: Path, entry: ModelEntry, inputs: set[str], outputs: set[str]) -> None:
    """Refuse a network without the entry's input and output names.

    Raises:
        ModelInputError: naming what the network has and the registry fields to fix.
    """
    if entry.input.input_name not in inputs or entry.output.output_name not in outputs:
        raise ModelInputError(
            f"{path}: {entry.id} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; fix "
            "input.input_name/output.output_name"
        )

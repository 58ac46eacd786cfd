"""Which engine and precision a run uses: decided from the entry, the machine and the verification results.

``auto`` takes, among the (engine, precision) pairs the entry allows and this machine runs, the fastest that
passes its check (``check``: :func:`zoo.verify.check_precision`, the bundled test against fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zoo.engines import ENGINES, engine_module
from zoo.errors import ProviderError
from zoo.registry import ModelEntry

#: Expected speed order on a CPU (fastest first), measured with ``benchmarks/bench_runner.py --big --mpp 2``:
#: bf16 on OpenVINO ran 1.9x ONNX Runtime fp32; ONNX Runtime fp32 ran 1.01-1.06x faster than OpenVINO fp32
#: (``--engines onnxruntime:fp32 openvino:fp32``). An engine not listed comes after these.
#: int8 (a quantised copy; only where an entry registers one) on OpenVINO ran 1.6-1.8x bf16 and on ONNX Runtime
#: 2.3x its fp32 (tumour-tiles 1.2.0, ``benchmarks/evaluate_real_tissue.py --parts precisions``).
CPU_PREFERENCE = [
    ("openvino", "int8"), ("openvino", "bf16"), ("onnxruntime", "int8"), ("openvino", "fp16"), ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
]  # fmt: skip

#: Expected speed order on a CUDA GPU (fastest first), from inference alone on an H100
#: (``benchmarks/bench_gpu_torch.py``: fp16 >= bf16 > fp32 at batch 128); not yet confirmed end to end
#: (``benchmarks/bench_gpu_runner.py``). ONNX Runtime runs there only with onnxruntime-gpu installed.
GPU_PREFERENCE = [("torch", "fp16"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("torch", "fp32")]

#: (engine, precision) -> {"ok": bool, "skipped"/"detail"/"error": str, ...}
Check = Callable[[str, str], dict[str, Any]]


@dataclass
class EngineChoice:
    """The engine and precision a run uses, and why."""

    engine: str
    precision: str
    reason: str
    considered: list[dict[str, Any]] = field(default_factory=list)


def engine_unavailable(engine: str, precision: str = "fp32", device: int | None = None) -> str | None:
    """Why ``engine`` cannot run ``precision`` on this machine, or None when it can."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r} ({', '.join(ENGINES)})"
    reason: str | None = engine_module(engine).unavailable(precision, device)
    return reason


def gpu_engines(
    entry: ModelEntry, engine: str = "auto", providers: list[str] | None = None, device: int | None = None
) -> set[str]:
    """The engines that would run ``entry`` on a GPU here: ONNX Runtime with its CUDA provider, and torch
    when it sees a CUDA GPU (checked only when the entry allows torch, and without importing it on machines
    with no NVIDIA driver)."""
    from zoo.engines.onnxruntime_engine import default_providers
    from zoo.engines.torch_engine import torch_device

    out = set()
    if engine in ("auto", "onnxruntime") and "CUDAExecutionProvider" in (providers or default_providers()):
        out.add("onnxruntime")
    allows_torch = any("torch" in spec.engines for spec in entry.precisions.values())
    if engine in ("auto", "torch") and allows_torch:
        try:  # torch_device looks for an NVIDIA driver before importing torch
            if torch_device(device) != "cpu":
                out.add("torch")
        except ImportError:
            pass
    return out


def select(
    entry: ModelEntry, check: Check, engine: str = "auto", precision: str = "auto", gpu: set[str] | None = None
) -> EngineChoice:
    """The (engine, precision) to run ``entry`` with.

    ``auto`` takes, among the combinations the entry allows and this machine runs, the fastest that passes
    ``check``: on a GPU (``gpu``: the engines that run on one here, see :func:`gpu_engines`) in
    ``GPU_PREFERENCE`` order among those engines, else in ``CPU_PREFERENCE`` order. An explicit engine or
    precision that the entry does not allow, the machine cannot run, or that fails its check is an error.

    Raises:
        ProviderError: no allowed combination can run, or an explicit one fails.
    """
    allowed = [(e, p) for p, spec in entry.precisions.items() for e in spec.engines]
    wanted = [(e, p) for e, p in allowed if engine in ("auto", e) and precision in ("auto", p)]
    if not wanted:
        offer = ", ".join(f"{p} on {e}" for e, p in allowed)
        raise ProviderError(
            f"{entry.id}: --engine {engine} --precision {precision} is not allowed by its registry entry "
            f"(allowed: {offer}); pick one of those or auto"
        )
    on_gpu = [ep for ep in wanted if ep[0] in (gpu or set())]
    order = GPU_PREFERENCE if on_gpu else CPU_PREFERENCE
    wanted.sort(key=lambda ep: order.index(ep) if ep in order else len(order))
    considered = []
    for e, p in wanted:
        if on_gpu and (e, p) not in on_gpu:
            considered.append({"engine": e, "precision": p, "skipped": "a GPU is used: the engines that run on it"})
            continue
        res = check(e, p)
        considered.append(res)
        if res["ok"]:
            why = "requested" if engine != "auto" and precision != "auto" else "fastest allowed here that passes"
            return EngineChoice(e, p, f"{why}; {res.get('detail', '')}".strip("; "), considered)
    explain = "; ".join(
        f"{c['precision']} on {c['engine']}: {c.get('skipped') or c.get('detail') or c.get('error')}"
        for c in considered
    )
    raise ProviderError(f"{entry.id}: no allowed engine/precision can run here ({explain}); try --engine auto")

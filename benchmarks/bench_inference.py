"""Inference alone: ONNX Runtime session options and int8 quantisation, on this machine.

    python benchmarks/bench_inference.py [--model tissue-multires] [--mpp 2] [--slide PATH]

1. Session options: ms per tile for each graph optimisation level (basic, extended, all) with
   thread spinning on and off, on the same in-memory batch (the runner uses "all", spinning on).
2. int8: ONNX Runtime's post-training static quantisation (QDQ, per-channel int8 weights, uint8
activations) is calibrated on tiles of the bundled CMU slide at the model's resolution; both
models then run the same in-memory batches (speed, ms per tile), and the runner with each model
segments ``--slide`` (a different slide) so their masks can be compared (Dice, int8 vs float32).

int8 convolutions are fast only where the CPU has 8-bit dot-product instructions (AVX-512 VNNI,
AVX-VNNI, AMX, Arm dot-product); the script prints which of these the CPU reports. Results go to
benchmarks/results/bench_inference.json. The quantised model is written to a temporary folder and
deleted: it is an experiment, not a registered model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_int8_features() -> list[str]:
    """The 8-bit dot-product instruction sets this CPU reports (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return sorted({f for f in flags if f in wanted})


def ms_per_tile(run: Callable[[], object], n_tiles: int, repeats: int) -> float:
    """Mean ms per tile of ``run()`` (one batch of ``n_tiles``) over ``repeats`` calls, after a warm-up."""
    run()
    t = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - t) / (repeats * n_tiles) * 1000.0


def session_option_sweep(path: Path, input_name: str, batch: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """ms per tile for each graph optimisation level x thread spinning, on ``batch``."""
    import onnxruntime as ort

    rows = []
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        for spinning in ("1", "0"):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            so.intra_op_num_threads = os.cpu_count() or 1
            so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            ms = ms_per_tile(lambda: sess.run(None, {input_name: batch}), len(batch), repeats)  # noqa: B023
            rows.append({"optimisation": level, "spinning": spinning == "1", "ms_per_tile": ms})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tissue-multires", help="registered model")
    ap.add_argument("--mpp", type=float, default=2.0, help="resolution to calibrate and compare at (µm/px)")
    ap.add_argument(
        "--slide",
        type=Path,
        default=REPO.parent / "shared/data/slides/tcga-cr-7395-01a-01-ts1.svs",
        help="slide the two models' masks are compared on",
    )
    ap.add_argument("--calibration-tiles", type=int, default=64, help="tiles of the bundled slide to calibrate on")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size for the speed measurement")
    ap.add_argument("--repeats", type=int, default=6, help="timed batches per model")
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_inference.json", help="JSON results"
    )
    a = ap.parse_args()

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from bridge.edits import dice
    from zoo.cli import bundled_slide
    from zoo.registry import load_registry, verified_weights
    from zoo.runner import OnnxModel, RunOptions, plan_tiles, predict_slide
    from zoo.slide import open_slide, read_scaled

    reg = load_registry()
    entry = reg.get(a.model)
    if entry.input.mode != "tiled":
        print(f"{entry.id}: only tiled models are benchmarked here", file=sys.stderr)
        return 2
    fp32_path = verified_weights(entry, reg)
    pw, ph = entry.input.patch_size_px
    fp32 = OnnxModel(fp32_path, entry)

    bundled = bundled_slide()
    with open_slide(bundled) as s:  # the runner's tissue tiles of the bundled slide
        plan = plan_tiles(s, entry, RunOptions(target_mpp=a.mpp))
        jobs = plan.jobs[: a.calibration_tiles]
        tiles = [read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph) for j, i in jobs]
    calib = [fp32.preprocess(t[None]) for t in tiles]
    name = entry.input.input_name

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {name: x}

    with tempfile.TemporaryDirectory() as tmp:
        pre, int8_path = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        t = time.perf_counter()
        quantize_static(
            str(pre),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        quant_s = time.perf_counter() - t
        int8 = OnnxModel(int8_path, entry)

        batch = np.concatenate((calib * a.batch_size)[: a.batch_size])
        sweep = session_option_sweep(fp32_path, name, batch, a.repeats)
        speed = {
            "float32_ms_per_tile": ms_per_tile(lambda: fp32.predict(batch), len(batch), a.repeats),
            "int8_ms_per_tile": ms_per_tile(lambda: int8.predict(batch), len(batch), a.repeats),
        }
        opts = RunOptions(target_mpp=a.mpp, progress=False)
        with open_slide(a.slide) as s:
            p32 = predict_slide(s, fp32, opts)
            p8 = predict_slide(s, int8, opts)
        fg = entry.foreground[0].index
        agreement = dice(np.asarray(p32.mask) == fg, np.asarray(p8.mask) == fg)

    result = {
        "model": entry.id,
        "mpp": a.mpp,
        "cpu_cores": os.cpu_count(),
        "cpu_int8_dot_product": cpu_int8_features(),
        "providers": fp32.providers,
        "calibration": f"{len(calib)} tiles of {bundled.name}",
        "quantisation_seconds": quant_s,
        **speed,
        "int8_speedup": speed["float32_ms_per_tile"] / speed["int8_ms_per_tile"],
        "session_options": sweep,
        "compared_on": a.slide.name,
        "dice_int8_vs_float32": agreement,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(
        f"model {entry.id} at {a.mpp:g} µm/px; CPU cores {os.cpu_count()}; int8 dot-product: "
        f"{', '.join(result['cpu_int8_dot_product']) or 'none'}"
    )
    print("| graph optimisation | spinning | ms/tile (float32) |")
    print("|---|---|---|")
    for r in sweep:
        print(
            f"| {r['optimisation'].removeprefix('ORT_ENABLE_').lower()} | {'on' if r['spinning'] else 'off'} | "
            f"{r['ms_per_tile']:.1f} |"
        )
    print()
    print("| precision | ms/tile | speed-up | Dice vs float32 on " + a.slide.name + " |")
    print("|---|---|---|---|")
    print(f"| float32 | {speed['float32_ms_per_tile']:.1f} | 1.00 | 1 |")
    print(f"| int8 (QDQ) | {speed['int8_ms_per_tile']:.1f} | {result['int8_speedup']:.2f} | {agreement:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

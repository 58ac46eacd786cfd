"""Inference alone: int8 against the registered precisions, and ONNX Runtime's session options, on this machine.

    python benchmarks/bench_inference.py [--model tissue-multires] [--mpp 2 4] [--rounds 7] [--keep-float-convs N]

1. int8: the registered ONNX, its GroupNorms rewritten channels-last as the OpenVINO engine does
   (:func:`zoo.engines.openvino_rewrite.group_norm_channels_last`), is quantised by ONNX Runtime's post-training
   static quantisation (QDQ; per-channel int8 weights, uint8 activations; convolutions only, so
   normalisations and the head's activation stay in float; ``--keep-float-convs N`` leaves the first and
   last N in float too), calibrated on tissue tiles of the bundled CMU slide at the first ``--mpp``.
   ONNX Runtime fp32 (as exported and GroupNorm-rewritten) and int8 and OpenVINO fp32, bf16 and int8
   (the QDQ file; OpenVINO runs its convolutions in u8/i8 with VNNI, the rest at the stated precision)
   then run the same 8 real tiles, each through ``OnnxModel`` as ``zoo run`` builds it, **interleaved
   round by round** so that load on the shared machine hits them alike: ms per tile, min and median over
   rounds. The runner with each segments the shared slides (H&E and IHC; int8 was calibrated on none of
   them but the CMU crop) and the label masks are compared with ONNX Runtime fp32's (Dice), as ``zoo
   verify`` would judge a registered precision.
2. Session options: ms per tile for each ONNX Runtime graph optimisation level with thread spinning on
   and off (the runner uses "all", spinning on), also interleaved.

Results: benchmarks/results/bench_inference.json. The quantised file lives in a temporary folder and is
deleted: an experiment, not a registered model.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
SLIDES = REPO.parent / "shared/data/slides"


def cpu_int8_features() -> list[str]:
    """The 8-bit dot-product instruction sets this CPU reports (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    wanted = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return sorted({f for f in flags if f in wanted})


def ort_session_runs(path: Path, input_name: str, batch: np.ndarray) -> dict[str, Callable[[], object]]:
    """One ONNX Runtime session per graph optimisation level x thread spinning, each a run on ``batch``."""
    import onnxruntime as ort

    runs: dict[str, Callable[[], object]] = {}
    for level in ("BASIC", "EXTENDED", "ALL"):
        for spinning in ("1", "0"):
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
            so.intra_op_num_threads = os.cpu_count() or 1
            so.add_session_config_entry("session.intra_op.allow_spinning", spinning)
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            label = f"{level.lower()}, spinning {'on' if spinning == '1' else 'off'}"
            runs[label] = lambda s=sess: s.run(None, {input_name: batch})  # type: ignore[misc]
    return runs


def quantise(
    fp32_path: Path, out_dir: Path, calib: list[np.ndarray], input_name: str, keep_float: int = 0
) -> tuple[Path, float]:
    """Static QDQ int8 (per-channel weights, uint8 activations, convolutions only) of the GroupNorm-rewritten
    graph, calibrated on ``calib`` (network-format single-tile batches), the first and last ``keep_float``
    convolutions left in float; returns its path and seconds taken."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from zoo.engines.openvino_rewrite import group_norm_channels_last

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

    rewritten, pre, int8_path = out_dir / "rewritten.onnx", out_dir / "pre.onnx", out_dir / "int8.onnx"
    graph = group_norm_channels_last(onnx.load(str(fp32_path)))[0]
    onnx.save(graph, str(rewritten))
    convs = [n.name for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    excluded = convs[:keep_float] + convs[len(convs) - keep_float :] if keep_float else []
    quant_pre_process(str(rewritten), str(pre))
    t = time.perf_counter()
    quantize_static(
        str(pre),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "ConvTranspose"],
        nodes_to_exclude=excluded,
    )
    return int8_path, time.perf_counter() - t


def ov_conv_precisions(path: Path, precision: str) -> dict[str, int]:
    """How many convolution layers OpenVINO's CPU plugin runs at each precision, compiling ``path`` at
    ``precision`` ("f32", "bf16"): a QDQ file's convolutions show as u8/i8 where it uses int8 kernels."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if kind in ("Convolution", "Deconvolution"):
            key = f"{kind} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tissue-multires", help="registered tiled model (one RGB input)")
    ap.add_argument(
        "--mpp", type=float, nargs="+", default=[2.0, 4.0], help="resolutions masks are compared at (µm/px)"
    )
    ap.add_argument(
        "--calibration-tiles",
        type=int,
        default=64,
        help="tissue tiles of the bundled slide to calibrate on (at most as many as it has)",
    )
    ap.add_argument(
        "--keep-float-convs", type=int, default=0, help="first and last N convolutions left unquantised (float)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per inference call")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (min and median reported)")
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_inference.json", help="JSON results"
    )
    a = ap.parse_args()

    import logging

    from bench_openvino import interleaved_ms, real_tiles  # type: ignore[import-not-found]

    from bridge.edits import dice
    from zoo.cli import bundled_slide
    from zoo.engines.model import OnnxModel
    from zoo.engines.select import engine_unavailable
    from zoo.registry import load_registry, verified_weights
    from zoo.runner import RunOptions, plan_tiles, predict_slide
    from zoo.slide import open_slide, read_scaled

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser warns once per GroupNorm constant
    reg = load_registry()
    entry = reg.get(a.model)
    if entry.input.mode != "tiled":
        print(f"{entry.id}: only tiled models are benchmarked here", file=sys.stderr)
        return 2
    fp32_path = verified_weights(entry, reg)
    pw, ph = entry.input.patch_size_px
    reference = OnnxModel(fp32_path, entry)
    bundled = bundled_slide()
    with open_slide(bundled) as s:  # the runner's tissue tiles of the bundled slide
        plan = plan_tiles(s, entry, RunOptions(target_mpp=a.mpp[0]))
        jobs = plan.jobs[: a.calibration_tiles]
        calib = [
            reference.preprocess(read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph)[None]) for j, i in jobs
        ]
    tiles = real_tiles(reference, a.batch_size)
    no_openvino = engine_unavailable("openvino", "fp32")

    with tempfile.TemporaryDirectory() as tmp:
        int8_path, quant_s = quantise(fp32_path, Path(tmp), calib, entry.input.input_name, a.keep_float_convs)
        models = {
            "onnxruntime fp32": reference,
            # the graph OpenVINO gets; the runner leaves ONNX Runtime the exported one: this row says why
            "onnxruntime fp32, GroupNorms rewritten": OnnxModel(Path(tmp) / "rewritten.onnx", entry),
            "onnxruntime int8 (QDQ)": OnnxModel(int8_path, entry),
        }
        if not no_openvino:
            for label, path, precision in (
                ("openvino fp32", fp32_path, "fp32"),
                ("openvino bf16", fp32_path, "bf16"),
                ("openvino int8 (QDQ), fp32 elsewhere", int8_path, "fp32"),
                ("openvino int8 (QDQ), bf16 elsewhere", int8_path, "bf16"),
            ):
                models[label] = OnnxModel(path, entry, engine="openvino", precision=precision, batch_size=a.batch_size)
        conv_precisions = {} if no_openvino else ov_conv_precisions(int8_path, "bf16")
        inputs = {k: m.preprocess(tiles) for k, m in models.items()}
        ref_prob = reference.predict(inputs["onnxruntime fp32"])
        speed = interleaved_ms(
            {k: (lambda m=m, x=inputs[k]: m.predict(x)) for k, m in models.items()},  # type: ignore[misc]
            len(tiles),
            calls=4,
            rounds=a.rounds,
        )
        for k, m in models.items():
            speed[k]["max_abs_prob_diff_vs_fp32"] = float(np.abs(m.predict(inputs[k]) - ref_prob).max())
        fg = entry.foreground[0].index
        agreement: dict[str, dict[str, float]] = {k: {} for k in models if k != "onnxruntime fp32"}
        for slide in sorted(p for p in SLIDES.iterdir() if p.name != "broken.svs"):
            for mpp in a.mpp:
                opts = RunOptions(target_mpp=mpp, progress=False)
                with open_slide(slide) as s:
                    ref_mask = np.asarray(predict_slide(s, reference, opts).mask) == fg
                    for k, scores in agreement.items():
                        mask = np.asarray(predict_slide(s, models[k], opts).mask) == fg
                        scores[f"{slide.name} @ {mpp:g}"] = dice(ref_mask, mask)
        sweep = interleaved_ms(
            ort_session_runs(fp32_path, entry.input.input_name, inputs["onnxruntime fp32"]),
            len(tiles),
            calls=4,
            rounds=max(3, a.rounds // 2),
        )

    result = {
        "model": entry.id,
        "cpu_cores": os.cpu_count(),
        "cpu_int8_dot_product": cpu_int8_features(),
        "load_average": os.getloadavg(),
        "openvino": "not run: " + no_openvino if no_openvino else "run",
        "calibration": f"{len(calib)} tissue tiles of {bundled.name} at {a.mpp[0]:g} µm/px",
        "convolutions_left_float": 2 * a.keep_float_convs,
        "openvino_int8_convolutions_by_runtime_precision": conv_precisions,
        "quantisation_seconds": quant_s,
        "tiles": f"{len(tiles)} tissue tiles of cmu-1-small-region.svs and tcga-cr-7395-01a-01-ts1.svs",
        "rounds": a.rounds,
        "speed": speed,
        "dice_vs_onnxruntime_fp32": agreement,
        "session_options_fp32": sweep,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    base = speed["onnxruntime fp32"]["ms_per_tile_min"]
    int8_isa = ", ".join(result["cpu_int8_dot_product"]) or "none"
    load = " ".join(f"{x:.2f}" for x in result["load_average"])
    print(
        f"{entry.id}; CPU cores {os.cpu_count()}; int8 dot-product: {int8_isa}; load average {load}; {a.rounds} rounds"
    )
    print(
        f"int8: {result['calibration']}, {result['convolutions_left_float']} convolutions left float; "
        f"OpenVINO runs its convolutions as {conv_precisions or 'not run'}"
    )
    print("| engine, precision | ms/tile (min) | ms/tile (median) | vs ORT fp32 | max \\|Δp\\| | lowest Dice vs fp32 |")
    print("|---|---|---|---|---|---|")
    for k, r in speed.items():
        worst = min(agreement[k].values()) if k in agreement else 1.0
        print(
            f"| {k} | {r['ms_per_tile_min']:.2f} | {r['ms_per_tile_median']:.2f} | "
            f"{base / r['ms_per_tile_min']:.2f}x | {r['max_abs_prob_diff_vs_fp32']:.3f} | {worst:.5f} |"
        )
    print()
    print("| label-mask Dice vs ONNX Runtime fp32 | " + " | ".join(agreement) + " |")
    print("|---" * (len(agreement) + 1) + "|")
    for where in next(iter(agreement.values())):
        print(f"| {where} | " + " | ".join(f"{agreement[k][where]:.5f}" for k in agreement) + " |")
    print()
    print("| ONNX Runtime fp32 session options | ms/tile (min) | ms/tile (median) |")
    print("|---|---|---|")
    for k, r in sweep.items():
        print(f"| {k} | {r['ms_per_tile_min']:.2f} | {r['ms_per_tile_median']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

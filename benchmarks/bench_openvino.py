"""OpenVINO inference alone: what each of the runner's three OpenVINO changes is worth, on this machine.

    python benchmarks/bench_openvino.py [--model tissue-multires] [--precision bf16] [--rounds 5]

Compiles the registered ONNX four ways and runs the same real tiles (8 tissue tiles of the bundled
CMU slide and the TCGA slide, at the model's resolution) through each, interleaved round by round so
that load on the shared machine hits them alike; prints ms per tile (min and median over rounds),
GFLOP/s and the share of the machine's matrix-multiply rate for that precision:

1. as exported, dynamic batch, float32 input normalised by the runner (the runner before #15's last round);
2. GroupNorms rewritten channels-last (:func:`zoo.engines.openvino_rewrite.group_norm_channels_last`);
3. and a static batch;
4. and uint8 tiles normalised inside OpenVINO (what ``zoo run`` does now; the runner's table lookup
   is timed in the other three, where the reader thread does it).

Then OpenVINO's own per-layer profile (PERF_COUNT) of 1 and 3, summed by layer type, shows where the
time goes (layout Reorders around each exported GroupNorm). Results: benchmarks/results/bench_openvino.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def real_tiles(model: Any, n: int = 8) -> np.ndarray:
    """``n`` (N, H, W, 3) uint8 tissue tiles from the two bundled H&E slides, read as the runner reads them."""
    from zoo.runner import RunOptions, plan_tiles
    from zoo.slide import open_slide, read_scaled

    pw, ph = model.entry.input.patch_size_px
    tiles = []
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        with open_slide(REPO.parent / "shared/data/slides" / name) as s:
            plan = plan_tiles(s, model.entry, RunOptions())
            for j, i in plan.jobs[:: max(1, len(plan.jobs) // (n // 2))][: n // 2]:
                tiles.append(read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph))
    return np.stack(tiles)


def interleaved_ms(runs: dict[str, Callable[[], object]], n_tiles: int, calls: int, rounds: int) -> dict[str, Any]:
    """ms per tile of each ``run()`` (one batch of ``n_tiles``): ``calls`` batches per round, the runs
    taking turns round by round after one warm-up each; min and median over rounds."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            t = time.perf_counter()
            for _ in range(calls):
                run()
            seconds[label].append((time.perf_counter() - t) / (calls * n_tiles) * 1e3)
    return {k: {"ms_per_tile_min": min(v), "ms_per_tile_median": statistics.median(v)} for k, v in seconds.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tissue-multires", help="registered model (one RGB input)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="OpenVINO precision")
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per inference call")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (min and median reported)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_openvino.json", help="JSON results")
    a = ap.parse_args()

    import onnx
    import openvino as ov
    from bench_runner import (  # type: ignore[import-not-found]
        bf16_gemm_gflops,
        onnx_gflop_per_tile,
        openvino_gemm_gflops,
        sgemm_gflops,
    )

    from zoo.engines.model import OnnxModel
    from zoo.engines.openvino_engine import OV_PRECISION, ov_uint8_input
    from zoo.engines.openvino_rewrite import group_norm_channels_last
    from zoo.registry import load_registry, verified_weights

    reg = load_registry()
    entry = reg.get(a.model)
    path = verified_weights(entry, reg)
    runner_model = OnnxModel(path, entry)  # its preprocess(): the runner's float32 table lookup
    tiles = real_tiles(runner_model, a.batch_size)
    x_float = runner_model.preprocess(tiles)
    gflop = onnx_gflop_per_tile(path, entry.input.patch_size_px)
    library = bf16_gemm_gflops() if a.precision == "bf16" else sgemm_gflops()
    rate = max(library or 0.0, openvino_gemm_gflops(a.precision) or 0.0)  # the best library's rate

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[a.precision], "PERFORMANCE_HINT": "LATENCY"}
    exported = onnx.load(str(path))
    rewritten, n_norms = group_norm_channels_last(exported)
    name = entry.input.input_name
    w, h = entry.input.patch_size_px

    def compile_variant(proto: onnx.ModelProto, static: bool, uint8: bool, profile: bool = False) -> Any:
        model = core.read_model(model=proto.SerializeToString(), weights=ov.Tensor(np.empty(0, np.uint8)))
        if static:
            model.reshape({name: [a.batch_size, entry.input.channels, h, w]})
        if uint8:
            model = ov_uint8_input(model, entry.input)
        return core.compile_model(model, "CPU", {**config, "PERF_COUNT": profile}).create_infer_request()

    variants = {
        "as exported, dynamic batch": (compile_variant(exported, False, False), False),
        "GroupNorm channels-last": (compile_variant(rewritten, False, False), False),
        "+ static batch": (compile_variant(rewritten, True, False), False),
        "+ uint8 in (zoo run)": (compile_variant(rewritten, True, True), True),
    }
    outputs = {
        label: np.array(request.infer({name: tiles if uint8 else x_float})[0])
        for label, (request, uint8) in variants.items()
    }
    timing = interleaved_ms(
        {  # the float variants pay for the runner's normalisation, as they did in the reader thread
            label: (lambda r=request, u=uint8: r.infer({name: tiles if u else runner_model.preprocess(tiles)}))  # type: ignore[misc]
            for label, (request, uint8) in variants.items()
        },
        a.batch_size,
        calls=6,
        rounds=a.rounds,
    )
    ref = outputs["as exported, dynamic batch"]
    rows = []
    for label, ms in timing.items():
        best_s = ms["ms_per_tile_min"] / 1e3
        rows.append(
            {
                "variant": label,
                **ms,
                "gflops": gflop / best_s,
                "of_matmul_rate": gflop / best_s / rate,
                "max_abs_diff_vs_exported": float(np.abs(outputs[label] - ref).max()),
            }
        )
    profiles = {}
    for label, proto, static in (("as exported", exported, False), ("rewritten, static", rewritten, True)):
        request = compile_variant(proto, static, False, profile=True)
        for _ in range(3):
            request.infer({name: x_float})
        by_type: dict[str, float] = defaultdict(float)
        for p in request.profiling_info:
            by_type[p.node_type] += p.real_time.total_seconds() * 1e3 / a.batch_size
        profiles[label] = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
    result = {
        "model": a.model,
        "precision": a.precision,
        "openvino": ov.__version__,
        "group_norms_rewritten": n_norms,
        "gflop_per_tile": gflop,
        "matmul_rate_gflops": rate,
        "rows": rows,
        "profile_ms_per_tile_by_layer_type": profiles,
    }
    a.out.write_text(json.dumps(result, indent=1))
    print(
        f"{a.model}, OpenVINO {ov.__version__} {a.precision}, batch {a.batch_size}, {gflop:.2f} GFLOP per tile, "
        f"matrix-multiply rate {rate:.0f} GFLOP/s, {a.rounds} interleaved rounds"
    )
    print("| variant | ms/tile (min) | ms/tile (median) | GFLOP/s | of matmul rate | max abs diff vs exported |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['ms_per_tile_min']:.2f} | {r['ms_per_tile_median']:.2f} | {r['gflops']:.0f} | "
            f"{r['of_matmul_rate']:.0%} | {r['max_abs_diff_vs_exported']:.3f} |"
        )
    for label, prof in profiles.items():
        total = sum(prof.values())
        top = ", ".join(f"{k} {v:.2f} ({v / total:.0%})" for k, v in list(prof.items())[:5])
        print(f"- profile, {label}: {total:.2f} ms/tile: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

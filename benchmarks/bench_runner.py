"""Speed and memory of `zoo run` against FAST on the same slide and the same ONNX model, in one run.

    python benchmarks/bench_runner.py [--slide PATH] [--model tissue-multires] [--mpp 1 2 4 8] [--big]

For each resolution it runs, each in its own process (so peak RSS is its own):

* ``zoo``   the runner (prefetch thread + batched ONNX Runtime + band stitching);
* ``floor`` reading and decoding exactly the tiles the runner ran, no inference (the I/O limit);
* ``infer`` ONNX Runtime alone on as many tiles as the runner ran, already in memory (the
  compute limit; on a CPU, decoding and inference share the same cores, so the runner cannot
  beat ``floor + infer`` by more than what the idle moments of each allow);
* ``fast``  FAST (pyfast) running the model's kept ``pipelines/<model>_export.fpl`` at the same
  magnification, overlap and patch size (tissue models are rendered without FAST's
  TissueSegmentation gate, see bridge/fpl.py, so FAST runs every patch).

It prints wall time, tiles/s, level-0 tissue megapixels/s, peak RSS and the ratios zoo/FAST,
zoo/floor and zoo/(floor + infer), plus the model's GFLOP per tile (counted from the ONNX graph)
against this machine's measured single-precision matrix-multiply rate, so it is visible how close
inference runs to the arithmetic limit of the hardware.

``--big`` first writes a ~255-megapixel pyramidal JPEG TIFF (a 4x4 mosaic of the TCGA slide, see
make_big_slide.py) to show that memory stays bounded as slides grow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zoo.procstats import peak_rss_mb  # noqa: E402


def child_zoo(
    slide: str,
    model: str,
    mpp: float,
    mode: str,
    batch: int,
    engine: str = "onnxruntime",
    precision: str = "fp32",
    mode_arg: str = "",
    readers: str = "1",
) -> dict[str, Any]:
    from zoo.engines.model import OnnxModel
    from zoo.registry import load_registry, verified_weights
    from zoo.runner import RunOptions, plan_tiles, predict_slide
    from zoo.slide import open_slide, read_scaled

    reg = load_registry()
    entry = reg.get(model)
    with open_slide(slide) as s:
        if mode == "zoo":
            m = OnnxModel(verified_weights(entry, reg), entry, engine=engine, precision=precision, batch_size=batch)
            t = time.perf_counter()
            opts = RunOptions(target_mpp=mpp, progress=False, batch_size=batch, reader_threads=int(readers))
            pred = predict_slide(s, m, opts)
            secs = time.perf_counter() - t
            tissue_px0 = float(pred.mask.class_counts()[1:].sum()) * pred.downsample**2
            if mode_arg:  # the label mask, for Dice against fp32 in the parent
                np.save(mode_arg, pred.mask.to_array())
            return {
                "seconds": secs,
                "tiles": pred.stats["tiles_run"],
                "tissue_mpx0": tissue_px0 / 1e6,
                "providers": m.providers,
                "peak_rss_mb": peak_rss_mb(),
                "stats": pred.stats,
            }
        pw, ph = entry.input.patch_size_px
        t = time.perf_counter()
        plan = plan_tiles(s, entry, RunOptions(target_mpp=mpp))  # the runner's pre-mask and tile list
        if mode == "infer":  # compute floor: the runner's tile count through ONNX Runtime, tiles in memory
            m = OnnxModel(verified_weights(entry, reg), entry, engine=engine, precision=precision, batch_size=batch)
            n_tiles, pool = int(mode_arg), 4 * batch
            if not plan.jobs:  # all glass: nothing to infer
                return {"seconds": 0.0, "tiles": 0, "peak_rss_mb": peak_rss_mb()}
            sample = [read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph) for j, i in plan.jobs[:pool]]
            x_in = m.preprocess(np.stack([sample[k % len(sample)] for k in range(pool)]))
            m.predict(x_in[:batch])  # warm-up
            t = time.perf_counter()
            for done in range(0, n_tiles, batch):
                m.predict(x_in[done % pool : done % pool + min(batch, n_tiles - done)])
            return {"seconds": time.perf_counter() - t, "tiles": n_tiles, "peak_rss_mb": peak_rss_mb()}
        # floor: pre-mask, then read + decode the planned tiles, no inference
        for j, i in plan.jobs:
            read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph)
        return {"seconds": time.perf_counter() - t, "tiles": len(plan.jobs), "peak_rss_mb": peak_rss_mb()}


def onnx_gflop_per_tile(path: Path, patch_px: tuple[int, int]) -> float:
    """Multiply-adds x 2 of the Conv/ConvTranspose/MatMul nodes for one (1, C, H, W) tile, in GFLOP."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    inp = model.graph.input[0].type.tensor_type.shape.dim
    inp[0].dim_value = 1
    if len(inp) == 4 and not inp[2].dim_value:
        inp[2].dim_value, inp[3].dim_value = patch_px[1], patch_px[0]
    g = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.input, *g.output]}
    inits = {t.name: list(t.dims) for t in g.initializer}
    macs = 0
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        act = n.input[0] if n.op_type == "ConvTranspose" else n.output[0]
        if not all(shapes.get(act, [0])) or n.input[1] not in inits:
            raise ValueError(f"{path}: cannot infer the shapes around {n.op_type} {n.name!r}; FLOPs not counted")
        k = inits[n.input[1]]  # Conv (Cout, Cin/g, kh, kw); ConvTranspose (Cin, Cout/g, kh, kw); MatMul (K, N)
        trans_b = any(at.name == "transB" and at.i for at in n.attribute)
        per_out = int(np.prod(k[1:])) if n.op_type.startswith("Conv") else k[1] if trans_b else k[0]
        macs += int(np.prod(shapes[act])) * per_out
    return 2 * macs / 1e9


def sgemm_gflops(size: int = 2048, repeats: int = 8) -> float:
    """This machine's float32 matrix-multiply rate (numpy's BLAS, all cores), GFLOP/s."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - t) / 1e9


def bf16_gemm_gflops(size: int = 2048, repeats: int = 8) -> float | None:
    """This machine's bf16 matrix-multiply rate (torch/oneDNN on the CPU, all cores), GFLOP/s; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(size, size).to(torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def openvino_gemm_gflops(precision: str, size: int = 2048, repeats: int = 10) -> float | None:
    """OpenVINO's matrix-multiply rate at ``precision`` (one MatMul node, all cores), GFLOP/s; None without it.

    numpy's and torch's float32 GEMMs run at AVX2 speed on some AMD CPUs (about 200 GFLOP/s on the
    2-core Zen 5 here, against 430 for OpenVINO's AVX-512 kernel), so each precision's rate is the best
    of the libraries, not numpy's alone.
    """
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    from zoo.engines.openvino_engine import OV_PRECISION

    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    b = ops.constant(rng.standard_normal((size, size)).astype(np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "INFERENCE_NUM_THREADS": os.cpu_count() or 1}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    x = rng.standard_normal((size, size)).astype(np.float32)
    request.infer({0: x})
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        request.infer({0: x})
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def run_child(*args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_fast(slide: Path, model: str, mpp: float, workdir: Path) -> dict[str, Any]:
    """FAST on the kept export pipeline, with the magnification set to ``mpp``."""
    from bridge.fpl import read_fpl, write_fpl
    from zoo.errors import FplError
    from zoo.fastrun import fast_available, run_fast_pipeline_stats
    from zoo.registry import load_registry

    reason = fast_available()
    if reason:
        return {"error": reason}
    entry = load_registry().get(model)
    pipe = read_fpl(REPO / "pipelines" / f"{entry.name}_export.fpl")
    patch = pipe.block("patch")
    patch.attributes = [(k, f"{10.0 / mpp:g}" if k == "patch-magnification" else v) for k, v in patch.attributes]
    fpl = REPO / "pipelines" / f".bench_{os.getpid()}.fpl"  # beside the kept one so $CURRENT_PATH$ resolves
    fpl.write_text(write_fpl(pipe))
    out = workdir / f"fast_{mpp:g}.tiff"
    try:
        return run_fast_pipeline_stats(fpl, {"wsi": str(slide), "output": str(out)})
    except FplError as err:
        return {"error": str(err)}
    finally:
        fpl.unlink(missing_ok=True)


def min_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's record with ``seconds`` the minimum over the runs, plus their median and all of them."""
    secs = [r["seconds"] for r in runs]
    return {**runs[0], "seconds": min(secs), "seconds_median": statistics.median(secs), "seconds_all": secs}


TIA_VENV = REPO / "benchmarks" / ".venv-tiatoolbox"
#: TIAToolbox 2.1 needs torch<2.13 and its torchvision; onnx for zoo.engines.torch_graph (the same network and weights)
TIA_REQUIREMENTS = ["tiatoolbox==2.1.3", "torch==2.12.1", "torchvision==0.27.1", "onnx"]


def tiatoolbox_venv() -> Path:
    """TIAToolbox's own virtual environment (made on first use: several GB, a few minutes)."""
    py = TIA_VENV / "bin" / "python"
    if not py.exists():
        print(f"making {TIA_VENV} for TIAToolbox ({' '.join(TIA_REQUIREMENTS)})", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(TIA_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *TIA_REQUIREMENTS], check=True)
    return py


def run_tiatoolbox(slide: Path, mpp: float, repeat: int, workdir: Path) -> dict[str, Any]:
    """TIAToolbox's SemanticSegmentor with the same network and weights (benchmarks/peer_tiatoolbox.py), each run
    in its own process; ``mpp`` is the resolution zoo reads at, so both read the same pyramid level."""
    py = tiatoolbox_venv()
    runs = []
    for k in range(max(1, repeat)):
        out = workdir / f"tia_{mpp:g}_{k}"
        cmd = [str(py), str(REPO / "benchmarks" / "peer_tiatoolbox.py"), str(slide), repr(mpp), str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return min_median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument(
        "--slide",
        type=Path,
        default=REPO.parent / "shared/data/slides/tcga-cr-7395-01a-01-ts1.svs",
        help="slide to run on",
    )
    ap.add_argument("--model", default="tissue-multires", help="registered model")
    ap.add_argument("--mpp", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="resolutions (µm/px)")
    ap.add_argument("--batch-size", type=int, default=8, help="runner batch size")
    ap.add_argument("--big", action="store_true", help="benchmark on a generated 4x4 mosaic of --slide")
    ap.add_argument("--no-fast", action="store_true", help="skip FAST")
    ap.add_argument(
        "--peers",
        nargs="*",
        default=[],
        choices=["tiatoolbox"],
        help="more peers: tiatoolbox (SemanticSegmentor, in its own venv benchmarks/.venv-tiatoolbox, made here)",
    )
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["onnxruntime:fp32", "openvino:bf16"],
        help="ENGINE:PRECISION pairs to run the runner with (Dice of each label mask against the first)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of the runner per pair (min and median reported)")
    ap.add_argument("--reader-threads", type=int, default=1, help="the runner's tile reader threads")
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_runner.json", help="JSON results"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        s, m, mpp, mode, batch, *rest = a.child
        print(json.dumps(child_zoo(s, m, float(mpp), mode, int(batch), *rest)))
        return 0
    import tempfile

    from bridge.edits import dice

    pairs = [tuple(p.split(":", 1)) for p in a.engines]
    workdir = REPO / "benchmarks" / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    slide = a.slide
    if a.big:
        from make_big_slide import make_big_slide  # type: ignore[import-not-found]

        slide = make_big_slide(a.slide, workdir / "big_mosaic.tiff", 4)
    from zoo.registry import load_registry, verified_weights

    reg = load_registry()
    entry = reg.get(a.model)
    gflop_tile = onnx_gflop_per_tile(verified_weights(entry, reg), entry.input.patch_size_px)
    gemm = {
        "fp32 numpy": sgemm_gflops(),
        "fp32 openvino": openvino_gemm_gflops("fp32"),
        "bf16 torch": bf16_gemm_gflops(),
        "bf16 openvino": openvino_gemm_gflops("bf16"),
    }
    peaks = {p: max((v for k, v in gemm.items() if k.startswith(p) and v), default=0.0) for p in ("fp32", "bf16")}
    peak = peaks["fp32"]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-runner-"))
    for mpp in a.mpp:
        floor = run_child(str(slide), a.model, str(mpp), "floor", str(a.batch_size))
        fast = {"error": "skipped"} if a.no_fast else run_fast(slide, a.model, mpp, workdir)
        tia: dict[str, Any] = {"error": "not asked for (--peers tiatoolbox)"}
        if "tiatoolbox" in a.peers:
            from zoo.slide import choose_level, open_slide

            with open_slide(slide) as s:
                level_mpp = choose_level(s, target_mpp=mpp).mpp  # e.g. 2.0013514 on the mosaic: the same level
            tia = run_tiatoolbox(Path(slide), level_mpp, a.repeat, Path(scratch))
            if "labels" in tia:
                tia["mask"] = np.load(tia.pop("labels"))
        ref_mask = None
        for engine, precision in pairs:
            mask_file = scratch / f"{engine}-{precision}-{mpp}.npy"
            runs = [
                run_child(
                    str(slide),
                    a.model,
                    str(mpp),
                    "zoo",
                    str(a.batch_size),
                    engine,
                    precision,
                    str(mask_file),
                    str(a.reader_threads),
                )
                for _ in range(max(1, a.repeat))
            ]
            zoo = min_median(runs)
            mask = np.load(mask_file)
            ref_mask = mask if ref_mask is None else ref_mask
            fg = [int(v) for v in np.unique(ref_mask) if v != 0] or [1]
            dice_vs_first = min(dice(mask == v, ref_mask == v) for v in fg)
            infer = run_child(
                str(slide), a.model, str(mpp), "infer", str(a.batch_size), engine, precision, str(zoo["tiles"])
            )
            rate = peaks.get(precision) or peak
            row = _row(slide, mpp, engine, precision, zoo, floor, infer, fast, gflop_tile, rate, dice_vs_first)
            row["matmul_rates_gflops"] = gemm
            if "seconds" in tia:
                h, w = (min(x, y) for x, y in zip(mask.shape, tia["mask"].shape))
                row["tiatoolbox"] = {k: v for k, v in tia.items() if k != "mask"}
                row["zoo_over_tiatoolbox"] = zoo["seconds"] / tia["seconds"]
                row["dice_vs_tiatoolbox"] = dice(mask[:h, :w] == 1, tia["mask"][:h, :w] == 1)
            elif "tiatoolbox" in a.peers:
                row["tiatoolbox"] = tia
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr)
    a.out.write_text(json.dumps(rows, indent=1))
    providers = sorted({p for r in rows for p in r["zoo"]["providers"]})
    load = os.getloadavg()
    print(
        f"slide: {slide.name}; model: {a.model} ({gflop_tile:.2f} GFLOP per tile); CPU cores: {os.cpu_count()}; "
        f"providers: {providers}; machine matrix multiply (GFLOP/s, the best per precision is the rate): "
        + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items() if v)
        + f"; load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; runner runs per row: {max(1, a.repeat)} (min, median)"
    )
    print(
        "| µm/px | engine | tiles | zoo s (min) | zoo s (median) | tiles/s | zoo RSS MB | floor s | zoo/floor | "
        "infer s | infer GFLOP/s | of matmul rate | zoo/(floor+infer) | FAST s | zoo/FAST | Dice vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["fast"]
        fs = f"{f['seconds']:.2f}" if "seconds" in f else "n/a"
        ratio = f"{r['zoo_over_fast']:.2f}" if r["zoo_over_fast"] else "n/a"
        print(
            f"| {r['mpp']:g} | {r['engine']} {r['precision']} | {r['zoo']['tiles']} | {r['zoo']['seconds']:.2f} | "
            f"{r['zoo']['seconds_median']:.2f} | {r['zoo_tiles_per_s']:.1f} | {r['zoo']['peak_rss_mb']:.0f} | "
            f"{r['floor']['seconds']:.2f} | {r['zoo_over_floor']:.2f} | {r['infer']['seconds']:.2f} | "
            f"{r['infer_gflops']:.0f} | {r['infer_gflops'] / r['matmul_gflops']:.0%} | "
            f"{r['zoo_over_floor_plus_infer']:.2f} | {fs} | {ratio} | "
            f"{r['dice_vs_first']:.5f} |"
        )
    for r in rows:
        if "zoo_over_tiatoolbox" in r:
            t = r["tiatoolbox"]
            print(
                f"- TIAToolbox {r['mpp']:g} µm/px: {t['seconds']:.2f} s (min), {t['seconds_median']:.2f} (median), "
                f"peak RSS {t['peak_rss_mb']:.0f} MB; zoo {r['engine']} {r['precision']}/TIAToolbox "
                f"{r['zoo_over_tiatoolbox']:.2f}, tissue Dice {r['dice_vs_tiatoolbox']:.4f}"
            )
        elif "tiatoolbox" in r:
            print(f"- TIAToolbox {r['mpp']:g} µm/px: {r['tiatoolbox'].get('error')}")
    print("\nWhere the runner's time goes (first run of each row; the reader thread overlaps the rest):")
    for r in rows:
        parts = r["zoo"].get("stats", {}).get("seconds_breakdown", {})
        print(
            f"- {r['mpp']:g} µm/px, {r['engine']} {r['precision']}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        )
    return 0


def _row(
    slide: Path,
    mpp: float,
    engine: str,
    precision: str,
    zoo: dict[str, Any],
    floor: dict[str, Any],
    infer: dict[str, Any],
    fast: dict[str, Any],
    gflop_tile: float,
    peak: float,
    dice_vs_first: float,
) -> dict[str, Any]:
    return {
        "slide": slide.name,
        "mpp": mpp,
        "engine": engine,
        "precision": precision,
        "dice_vs_first": dice_vs_first,
        "zoo": zoo,
        "floor": floor,
        "infer": infer,
        "fast": fast,
        "gflop_per_tile": gflop_tile,
        "matmul_gflops": peak,  # for this row's precision
        "infer_gflops": gflop_tile * infer["tiles"] / infer["seconds"],
        "zoo_over_floor_plus_infer": zoo["seconds"] / (floor["seconds"] + infer["seconds"]),
        "zoo_tiles_per_s": zoo["tiles"] / zoo["seconds"],
        "zoo_tissue_mpx0_per_s": zoo["tissue_mpx0"] / zoo["seconds"],
        "zoo_over_floor": zoo["seconds"] / max(floor["seconds"], 1e-9),
        "zoo_over_fast": zoo["seconds"] / fast["seconds"] if "seconds" in fast else None,
    }


if __name__ == "__main__":
    raise SystemExit(main())

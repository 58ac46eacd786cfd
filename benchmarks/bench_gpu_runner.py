"""The runner end to end on a GPU (``--engine torch``): tiles/s at fp32/fp16/bf16, batch sizes and reader threads.

    python benchmarks/bench_gpu_runner.py --tcga PATH/tcga-cr-7395-01a-01-ts1.svs --out results.json

For the lent GPU machine (torch with CUDA, CPU-only onnxruntime, 64 MiB per call): the slide stack's
wheels are carried and installed there, and the slides are made there:

* ``mosaic``: the CPU benchmark's slide (``make_big_slide.py``: a 4x4 mosaic of the TCGA slide, 254 MPx);
* ``dense100k``: a 100,000² px Aperio-layout pyramid at 0.25 µm/px, tissue everywhere (``bench_memory.py``'s
  generator with ``dense``: real H&E tiles of the bundled CMU slide, repeated), the worst case for throughput.

For each slide and µm/px it measures, in one process:

* ``infer``: the engine alone on tiles already in memory (host arrays in, probabilities out, so it includes
  the copies to and from the GPU), per precision and batch size: the inference floor;
* ``e2e``: :func:`zoo.runner.predict_slide` (pre-mask, reading, JPEG decoding, resampling, normalising,
  inference, overlap blending, thresholding into the label mask) per precision, batch size and number of
  reader threads, with its time breakdown;
* the label-mask Dice of every run against torch fp32 on the same slide, and of torch fp32 against ONNX
  Runtime fp32 (CPU) on the mosaic.

Each point is run ``--repeat`` times (min and median). Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def dice_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-class Dice over the foreground labels present in either mask."""
    from bridge.edits import dice

    labels = (set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}
    return min((dice(a == v, b == v) for v in labels), default=1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcga", type=Path, required=True, help="the TCGA slide the mosaic is made of")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"), help="where the slides are written")
    ap.add_argument("--out", type=Path, required=True, help="results file (JSON)")
    ap.add_argument("--model", default="tissue-multires")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    ap.add_argument("--readers", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--side", type=int, default=100_000, help="side of the dense pyramid (px)")
    ap.add_argument(
        "--points", nargs="+", default=["mosaic:2", "dense100k:2", "dense100k:1"], help="SLIDE:µm/px to measure at"
    )
    a = ap.parse_args()

    import torch
    from bench_memory import make_slide  # type: ignore[import-not-found]
    from make_big_slide import make_big_slide  # type: ignore[import-not-found]

    from zoo.engines.model import OnnxModel
    from zoo.registry import load_registry, verified_weights
    from zoo.runner import RunOptions, plan_tiles, predict_slide
    from zoo.slide import open_slide, read_scaled

    a.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    slides = {"mosaic": make_big_slide(a.tcga, a.work / "big_mosaic.tiff", 4)}
    made_mosaic = time.perf_counter() - t
    if any(pt.startswith("dense100k") for pt in a.points):
        slides["dense100k"] = make_slide(a.work / f"dense{a.side}.tiff", a.side, dense=True)
    print(f"slides made in {made_mosaic:.0f} + {time.perf_counter() - t - made_mosaic:.0f} s", file=sys.stderr)
    reg = load_registry()
    entry = reg.get(a.model)
    path = verified_weights(entry, reg)
    models = {p: OnnxModel(path, entry, engine="torch", precision=p) for p in a.precisions}
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "model": entry.id,
        "providers": {p: m.providers for p, m in models.items()},
        "infer": [],
        "e2e": [],
        "dice": [],
    }
    points = [(pt.split(":")[0], float(pt.split(":")[1])) for pt in a.points]
    pw, ph = entry.input.patch_size_px
    for name, mpp in points:
        with open_slide(slides[name]) as s:
            plan = plan_tiles(s, entry, RunOptions(target_mpp=mpp))
            sample = [read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph) for j, i in plan.jobs[:256]]
        pool = models["fp32"].preprocess(np.stack([sample[k % len(sample)] for k in range(256)]))
        for p, m in models.items():  # inference alone, tiles in host memory
            for b in a.batches:
                m.predict(pool[:b])  # warm-up (cuDNN picks its kernels for this batch size)
                n = max(b, min(2048, 16 * b))
                secs = []
                for _ in range(a.repeat):
                    t = time.perf_counter()
                    for k in range(0, n, b):
                        m.predict(pool[k % 256 : k % 256 + b])
                    secs.append(time.perf_counter() - t)
                row = {"slide": name, "mpp": mpp, "precision": p, "batch": b, "tiles": n}
                row |= {"tiles_per_s_max": n / min(secs), "tiles_per_s_median": n / statistics.median(secs)}
                res["infer"].append(row)
                print(json.dumps(row), file=sys.stderr)
        ref: np.ndarray | None = None
        grid = [(p, 64, r) for p in a.precisions for r in a.readers]
        grid += [(p, b, max(a.readers)) for p in a.precisions for b in a.batches if b != 64]
        for p, b, r in grid:
            secs, stats, mask = [], {}, None
            for _ in range(a.repeat):
                with open_slide(slides[name]) as s:
                    t = time.perf_counter()
                    pred = predict_slide(
                        s, models[p], RunOptions(target_mpp=mpp, batch_size=b, reader_threads=r, progress=False)
                    )
                    secs.append(time.perf_counter() - t)
                    stats = pred.stats
                    if mask is None:
                        mask = pred.mask.to_array()
                    pred.close()
            assert mask is not None
            if p == "fp32" and ref is None:
                ref = mask
            row = {"slide": name, "mpp": mpp, "precision": p, "batch": b, "readers": r, "tiles": stats["tiles_run"]}
            row |= {
                "seconds_min": min(secs),
                "seconds_median": statistics.median(secs),
                "tiles_per_s_max": stats["tiles_run"] / min(secs),
                "breakdown": stats["seconds_breakdown"],
                "dice_vs_torch_fp32": None if ref is None else dice_min(mask, ref),
            }
            res["e2e"].append(row)
            print(json.dumps(row), file=sys.stderr)
            a.out.write_text(json.dumps(res, indent=1))
        if name == "mosaic" and ref is not None:  # torch fp32 on the GPU against ONNX Runtime fp32 on the CPU
            ort = OnnxModel(path, entry, engine="onnxruntime", precision="fp32")
            with open_slide(slides[name]) as s:
                pred = predict_slide(s, ort, RunOptions(target_mpp=mpp, batch_size=16, progress=False))
                cpu = pred.mask.to_array()
                pred.close()
            res["dice"].append({"slide": name, "mpp": mpp, "torch_fp32_vs_onnxruntime_fp32": dice_min(ref, cpu)})
    a.out.write_text(json.dumps(res, indent=1))
    print(f"device: {res['device']}; torch {res['torch']}; {res['cpu_cores']} CPU cores; model {entry.id}")
    print("| slide | µm/px | precision | batch | readers | tiles | s (min) | s (median) | tiles/s | Dice vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["e2e"]:
        d = "" if r["dice_vs_torch_fp32"] is None else f"{r['dice_vs_torch_fp32']:.5f}"
        print(
            f"| {r['slide']} | {r['mpp']:g} | {r['precision']} | {r['batch']} | {r['readers']} | {r['tiles']} | "
            f"{r['seconds_min']:.2f} | {r['seconds_median']:.2f} | {r['tiles_per_s_max']:.0f} | {d} |"
        )
    print("\nInference alone (host arrays in and out), tiles/s (max over repeats):")
    for r in res["infer"]:
        print(f"- {r['slide']} {r['mpp']:g} µm/px {r['precision']} batch {r['batch']}: {r['tiles_per_s_max']:.0f}")
    print(json.dumps(res["dice"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

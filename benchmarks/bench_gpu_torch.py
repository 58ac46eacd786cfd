"""Inference alone on a GPU with the project's torch definitions: fp32, fp16, bf16, batch 8-128.

For the GPU machine (torch with CUDA, a CPU-only onnxruntime, no registry, 64 MiB per call): the
tumour models' trained state dicts are carried in ``runs/gpu1`` (the ONNX files in ``models/`` hold
the same weights); each is first checked against ONNX Runtime (CPU) on its bundled test. The
refinement U-Net is timed at 1024 x 1024 (its state dict is not carried: the timing does not depend
on the weights). Slide decoding is not part of these figures.

    python benchmarks/bench_gpu_torch.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zoo.train.h2g import PatchClassifier, RefinementUNet  # noqa: E402
from zoo.train.tumour_tiles import TileCNN  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(net: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds per call (median of ``iters`` after warm-up)."""
    with torch.inference_mode():
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            net(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", type=Path, default=REPO / "runs/gpu1", help="trained state dicts")
    ap.add_argument("--out", type=Path, required=True, help="results file")
    ap.add_argument("--iters", type=int, default=30, help="timed calls per point")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    res: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    models = {  # network, state dict, bundled test input, registered ONNX file
        "tumour-tiles": (
            TileCNN(),
            a.state / "tiles/tiles.pt",
            REPO / "models/tumour-tiles/1.0.0/test_input.npy",
            REPO / "models/tumour-tiles/1.0.0/tumour-tiles.onnx",
        ),
        "tumour-h2g/patches": (
            PatchClassifier(),
            a.state / "h2g/patches.pt",
            REPO / "models/tumour-h2g/1.0.0/test_patches_input.npy",
            REPO / "models/tumour-h2g/1.0.0/patches.onnx",
        ),
    }
    for name, (net, state, test, onnx_path) in models.items():
        net.load_state_dict(torch.load(state, map_location="cpu"))
        net = net.eval().to(dev)
        x_test = torch.from_numpy(np.load(test)).to(dev)
        row: dict[str, object] = {}
        try:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            ref = sess.run(None, {"image": x_test.cpu().numpy()})[0]
            with torch.inference_mode():
                row["fp32_vs_onnxruntime_max_abs_diff"] = float(np.abs(net(x_test).float().cpu().numpy() - ref).max())
        except ImportError:
            row["fp32_vs_onnxruntime_max_abs_diff"] = "onnxruntime not installed"
        with torch.inference_mode():
            p32 = net(x_test).float()
        for prec, dt in DTYPES.items():
            n = net.to(dt)
            with torch.inference_mode():
                p = n(x_test.to(dt)).float()
            point: dict[str, object] = {
                "max_abs_diff_vs_fp32": float((p - p32).abs().max()),
                "same_argmax_as_fp32": bool(torch.equal(p.argmax(1), p32.argmax(1))),
            }
            for bs in (8, 16, 32, 64, 128):
                x = torch.rand(bs, 3, 96, 96, device=dev, dtype=dt)
                s = timed(n, x, a.iters)
                point[f"batch_{bs}_tiles_per_s"] = round(bs / s, 1)
            row[prec] = point
            net = n.to(torch.float32)
        res[name] = row
        print(json.dumps({name: row}), flush=True)
    unet = RefinementUNet().eval().to(dev)
    row = {}
    for prec, dt in DTYPES.items():
        n = unet.to(dt)
        row[prec] = {
            f"batch_{bs}_seconds_per_1024px_image": round(
                timed(n, torch.rand(bs, 4, 1024, 1024, device=dev, dtype=dt), 10) / bs, 5
            )
            for bs in (1, 4)
        }
        unet = n.to(torch.float32)
    res["tumour-h2g/refine"] = row
    print(json.dumps({"tumour-h2g/refine": row}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

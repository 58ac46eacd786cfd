"""Peak memory and seconds of one whole-slide network per engine setting, each in its own process.

    python benchmarks/bench_whole_slide_memory.py [--model tumour-h2g] [--stage refine]

For tumour-h2g's 1024 px refinement U-Net: ONNX Runtime with and without its CPU memory arena (the runner
turns the arena off for whole-slide networks, zoo/engines/onnxruntime_engine.py), OpenVINO fp32 and bf16.
Each row: seconds per run (mean of 2 after loading) and the process's peak RSS (MB), on random input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time, numpy as np
from zoo.procstats import peak_rss_mb
path, mode = sys.argv[1], sys.argv[2]
if mode.startswith("onnxruntime"):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = mode == "onnxruntime-arena"
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    shape = lambda i: [d if isinstance(d, int) else 1 for d in i.shape]
    feeds = {i.name: np.random.rand(*shape(i)).astype(np.float32) for i in s.get_inputs()}
    run = lambda: s.run(None, feeds)
else:
    import openvino as ov
    core = ov.Core()
    c = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": mode.split("-")[1]})
    shape = lambda i: [d.get_length() if d.is_static else 1 for d in i.get_partial_shape()]
    feeds = {i.get_any_name(): np.random.rand(*shape(i)).astype(np.float32) for i in c.inputs}
    run = lambda: c(feeds)
t = time.perf_counter(); run(); run()
print(json.dumps({"seconds": round((time.perf_counter() - t) / 2, 3), "peak_rss_mb": round(peak_rss_mb())}))
"""

MODES = ["onnxruntime-arena", "onnxruntime-no-arena", "openvino-f32", "openvino-bf16"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tumour-h2g", help="NAME[@VERSION] of a cascade")
    ap.add_argument("--stage", default="refine", help="the whole-slide stage")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from zoo.registry import load_registry

    reg = load_registry()
    entry = reg.get(a.model)
    stage = next(st for st in entry.stages if st.name == a.stage)
    path = str(reg.resolve(stage.weights.uri))
    res = {"model": entry.id, "stage": a.stage, "onnx": stage.weights.uri, "input_px": list(stage.input.patch_size_px)}
    for mode in MODES:
        r = subprocess.run([sys.executable, "-c", _CHILD, path, mode], capture_output=True, text=True, cwd=REPO)
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}
        print(mode, res[mode], flush=True)
    out = REPO / "benchmarks/results/bench_whole_slide_memory.json"
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

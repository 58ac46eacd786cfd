"""The runner end to end on a GPU (``--engine torch``): every model kind, fp32/fp16/bf16, batch sizes, reader threads.

    python benchmarks/bench_gpu_runner.py --lymph benchmarks/results/lymph_node.tiff --out results.json
        [--tcga PATH/tcga-cr-7395-01a-01-ts1.svs --points tcga:2] [--deadline-s 420]

For the lent GPU machine (torch with CUDA, CPU-only onnxruntime; the slide stack's wheels are carried and
installed there; 64 MiB travel in all). The slides are made there, each a 4x4 mosaic of a real slide
(``make_big_slide.py``):

* ``lymph``: 268 MPx of real lymph-node tissue with tumour in it at 0.972 µm/px, a 4x4 mosaic of
  ``make_lymph_node_slide.py``'s slide (PCam valid patches on real glass): every model's slide by default;
* ``tcga`` (with ``--tcga``): the CPU benchmarks' 254-MPx mosaic of the TCGA frozen section at 0.5 µm/px;
* ``dense100k`` (only when named in ``--points``): a 100,000² px pyramid with tissue everywhere.

In one process, each part for every model and slide before the next part (``--deadline-s`` skips what would
start late, and the results file is rewritten after every measurement, so a run cut short keeps what it
measured):

1. ``e2e``: the model's kind (:func:`zoo.kinds.predict`: pre-mask, reading, decoding, resampling, the uint8
   tiles to the GPU, normalising there, inference, blending or averaging, the label mask) at each precision
   with all reader threads, ``--repeat`` times (min and median), with its time breakdown, the share of the
   time outside inference, and the mask's agreement with torch fp32 on the GPU (share of equal labels, and
   the smallest per-class Dice);
2. ``cpu`` (``--cpu-models``): ONNX Runtime fp32 on this machine's CPU cores, the same job: seconds and
   its mask against torch fp32 on the GPU;
3. ``infer``: the first network alone on tiles already in host memory (copies to and from the GPU
   included), per precision and batch size, uint8 tiles (normalised on the GPU) and float32 (on the host);
4. the reader-thread and batch-size sweeps at fp16 (on a CPU: the last precision named).

Nothing here runs in CI.
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

#: each model's slide and µm/px, unless --points names others
DEFAULT_POINTS = {"tissue-multires": ["lymph:2"], "tumour-tiles": ["lymph:0.972"], "tumour-h2g": ["lymph:0.972"]}


def dice_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-class Dice over the foreground labels present in either mask."""
    out = 1.0
    for v in (set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0}:
        x, y = a == v, b == v
        total = int(x.sum()) + int(y.sum())
        out = min(out, 1.0 if total == 0 else 2 * int((x & y).sum()) / total)
    return out


def inference_seconds(stats: Any) -> float:
    """The engine's seconds in a kind's stats (summed over a cascade's stages)."""
    if isinstance(stats, dict):
        if "stages" in stats:
            return sum(inference_seconds(s) for s in stats["stages"].values())
        if "seconds_breakdown" in stats:
            return float(stats["seconds_breakdown"].get("inference", 0.0))
    return 0.0


class Bench:
    """Runs the measurements, keeps the results file up to date and the deadline."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t0 = time.perf_counter()
        self.res: dict[str, Any] = {"e2e": [], "cpu": [], "infer": [], "skipped": [], "failed": []}

    def time_left(self, what: str) -> bool:
        """False (and noted) when the deadline has passed."""
        if time.perf_counter() - self.t0 < self.a.deadline_s:
            return True
        self.res["skipped"].append(what)
        print(f"deadline: skipped {what}", file=sys.stderr)
        return False

    def save(self, row: dict[str, Any] | None = None) -> None:
        if row is not None:
            print(json.dumps(row), file=sys.stderr, flush=True)
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.a.out.write_text(json.dumps(self.res, indent=1))


def load_models(entry: Any, reg: Any, engine: str, precision: str, batch: int) -> dict[str, Any]:
    """Each network of ``entry`` on ``engine`` at ``precision`` (its fp32 file: torch casts)."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_model_files

    return {
        name: OnnxModel(verified_model_files(view, reg, "fp32")[0], view, engine=engine, precision=precision,
                        batch_size=batch)
        for name, view in entry.networks()
    }  # fmt: skip


def run_job(slide_path: Path, entry: Any, models: dict[str, Any], mpp: float, batch: int, readers: int) -> tuple:
    """One job as ``zoo run`` predicts it (open, pre-mask, the kind's prediction, label mask): seconds, stats,
    mask."""
    from zoo.kinds import predict as predict_kind
    from zoo.runner import RunOptions
    from zoo.slide import open_slide

    opts = RunOptions(target_mpp=mpp, batch_size=batch, reader_threads=readers, progress=False)
    t = time.perf_counter()
    with open_slide(slide_path) as s:
        pred = predict_kind(s, entry, models, opts)
        mask = pred.mask.to_array()
        secs = time.perf_counter() - t
        stats = pred.stats
        pred.close()
    return secs, stats, mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcga", type=Path, help="the TCGA slide the CPU benchmarks' mosaic is made of")
    ap.add_argument("--lymph", type=Path, help="make_lymph_node_slide.py's slide, the tumour models' mosaic")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"), help="where the slides are written")
    ap.add_argument("--out", type=Path, required=True, help="results file (JSON)")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_POINTS))
    ap.add_argument("--points", nargs="+", help="SLIDE:µm/px for every model (default: each model's own)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    ap.add_argument("--batch", type=int, default=128, help="tiles per engine call in the e2e and CPU runs")
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128, 512], help="inference alone")
    ap.add_argument("--e2e-batches", nargs="+", type=int, default=[32, 512], help="the e2e batch sweep")
    ap.add_argument("--readers", nargs="+", type=int, default=[1, 4, 8], help="the reader sweep (and all cores)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweep-repeat", type=int, default=2)
    ap.add_argument("--mosaic", type=int, default=4, help="n of the n x n mosaics")
    ap.add_argument("--side", type=int, default=100_000, help="side of the dense pyramid (px)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start nothing new after this many seconds")
    ap.add_argument(
        "--cpu-models", nargs="*", default=["tissue-multires"], help="models also run by ONNX Runtime on the CPU"
    )
    a = ap.parse_args()

    import torch
    from make_big_slide import make_big_slide  # type: ignore[import-not-found]

    from zoo.registry import load_registry

    b = Bench(a)
    cores = os.cpu_count() or 1
    res = b.res
    res |= {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "cpu_cores": cores,
        "reader_threads": min(16, cores),
        "batch": a.batch,
    }
    a.work.mkdir(parents=True, exist_ok=True)
    needed = {p.split(":")[0] for m in a.models for p in (a.points or DEFAULT_POINTS.get(m, ["lymph:0.972"]))}
    slides: dict[str, Path] = {}
    t = time.perf_counter()
    if "tcga" in needed:
        if a.tcga is None:
            ap.error("--tcga is needed for the point 'tcga'")
        slides["tcga"] = make_big_slide(a.tcga, a.work / "tcga_mosaic.tiff", a.mosaic)
    if "lymph" in needed:
        if a.lymph is None:
            ap.error("--lymph is needed for the tumour models' slide")
        slides["lymph"] = make_big_slide(a.lymph, a.work / "lymph_mosaic.tiff", a.mosaic, mpp=0.972)
    if "dense100k" in needed:
        from bench_memory import make_slide  # type: ignore[import-not-found]

        slides["dense100k"] = make_slide(a.work / f"dense{a.side}.tiff", a.side, dense=True)
    res["slides_made_s"] = round(time.perf_counter() - t, 1)
    print(f"slides made in {res['slides_made_s']} s", file=sys.stderr)
    reg = load_registry()

    points: list[Point] = []
    for model_id in a.models:
        entry = reg.get(model_id)
        models = {p: load_models(entry, reg, "torch", p, a.batch) for p in a.precisions}
        res.setdefault("providers", {})[entry.id] = {
            p: {k: m.providers for k, m in ms.items()} for p, ms in models.items()
        }
        for point in a.points or DEFAULT_POINTS.get(model_id, ["lymph:0.972"]):
            name, mpp = point.split(":")[0], float(point.split(":")[1])
            points.append(Point(b, reg, entry, models, slides[name], {"model": entry.id, "slide": name, "mpp": mpp}))
    for part in (Point.precisions, Point.cpu, Point.infer, Point.sweeps):  # the most telling part first
        for pt in points:
            try:
                part(pt)
            except Exception as err:  # out of GPU memory, say: noted, and the next part runs
                b.res["failed"].append(f"{part.__name__} {pt.what}: {type(err).__name__}: {err}")
                b.save()
                print(f"failed: {b.res['failed'][-1]}", file=sys.stderr)
                torch.cuda.empty_cache()
    b.save()
    print_tables(res)
    return 0


class Point:
    """One model on one slide at one µm/px: parts 1-4 of the module docstring, each a method."""

    def __init__(self, b: Bench, reg: Any, entry: Any, models: dict[str, dict[str, Any]], slide_path: Path,
                 where: dict[str, Any]) -> None:  # fmt: skip
        self.b, self.reg, self.entry, self.models, self.slide_path, self.where = (
            b,
            reg,
            entry,
            models,
            slide_path,
            where,
        )
        self.mpp = float(where["mpp"])
        self.all_readers = min(16, os.cpu_count() or 1)
        self.ref: np.ndarray | None = None
        self.warm: set[tuple[str, int]] = set()
        self.what = f"{entry.id} {where['slide']}"

    def e2e(self, p: str, batch: int, readers: int, repeat: int, part: str) -> None:
        """The job ``repeat`` times (after a warm-up at a new precision and batch size)."""
        b, ms = self.b, self.models[p]
        if not b.time_left(f"{part} {self.what} {p} batch {batch} readers {readers}"):
            return
        if (p, batch) not in self.warm:  # cuDNN picks its kernels for each new input shape
            run_job(self.slide_path, self.entry, ms, self.mpp, batch, readers)
            self.warm.add((p, batch))
        secs, stats, mask = [], {}, None
        for _ in range(repeat):
            s, stats, mask = run_job(self.slide_path, self.entry, ms, self.mpp, batch, readers)
            secs.append(s)
        assert mask is not None
        if p == "fp32" and self.ref is None:
            self.ref = mask
        ref, infer = self.ref, inference_seconds(stats)
        row = self.where | {"part": part, "precision": p, "batch": batch, "readers": readers}
        row |= {
            "tiles": stats.get("tiles_run"),
            "seconds_min": round(min(secs), 3),
            "seconds_median": round(statistics.median(secs), 3),
            "tiles_per_s_max": None if not stats.get("tiles_run") else round(stats["tiles_run"] / min(secs)),
            "share_outside_inference": round(1 - infer / secs[-1], 3),
            "labels_as_torch_fp32": None if ref is None else round(float(np.mean(mask == ref)), 6),
            "dice_min_vs_torch_fp32": None if ref is None else round(dice_min(mask, ref), 5),
            "stats": stats,
        }
        b.res["e2e"].append(row)
        b.save(row)

    def precisions(self) -> None:
        """1. Every precision with all reader threads."""
        for p in self.b.a.precisions:
            self.e2e(p, self.b.a.batch, self.all_readers, self.b.a.repeat, "e2e")

    def cpu(self) -> None:
        """2. ONNX Runtime fp32 on the CPU cores, against torch fp32 on the GPU."""
        b, ref = self.b, self.ref
        if self.entry.name not in b.a.cpu_models or ref is None or not b.time_left(f"cpu {self.what}"):
            return
        cpu = load_models(self.entry, self.reg, "onnxruntime", "fp32", 16)
        secs, stats, mask = run_job(self.slide_path, self.entry, cpu, self.mpp, 16, self.all_readers)
        row = self.where | {"engine": "onnxruntime fp32 CPU", "batch": 16, "readers": self.all_readers}
        row |= {
            "seconds": round(secs, 3),
            "tiles": stats.get("tiles_run"),
            "labels_torch_fp32_gpu_vs_onnxruntime_fp32_cpu": round(float(np.mean(mask == ref)), 6),
            "dice_min": round(dice_min(mask, ref), 5),
        }
        b.res["cpu"].append(row)
        b.save(row)

    def infer(self) -> None:
        """3. The first network alone."""
        if self.b.time_left(f"infer {self.what}"):
            infer_alone(self.b, self.entry, self.models, self.slide_path, self.mpp, self.where)

    def sweeps(self) -> None:
        """4. Reader threads and batch sizes at fp16 (on a CPU: the last precision named)."""
        a = self.b.a
        sweep = "fp16" if "fp16" in self.models else a.precisions[-1]
        for r in a.readers:
            self.e2e(sweep, a.batch, r, a.sweep_repeat, "readers")
        for bs in a.e2e_batches:
            if bs != a.batch:
                self.e2e(sweep, bs, self.all_readers, a.sweep_repeat, "batch")


def infer_alone(b: Bench, entry: Any, models: dict[str, dict[str, Any]], slide_path: Path, mpp: float,
                where: dict[str, Any]) -> None:  # fmt: skip
    """Tiles/s of the first network on 256 of the slide's tiles in host memory, per precision and batch,
    uint8 tiles and float32 input."""
    from zoo.runner import RunOptions, plan_tiles
    from zoo.slide import open_slide, read_scaled

    pw, ph = entry.input.patch_size_px
    with open_slide(slide_path) as s:
        plan = plan_tiles(s, entry, RunOptions(target_mpp=mpp))
        sample = [read_scaled(s, plan.choice, plan.xs[i], plan.ys[j], pw, ph) for j, i in plan.jobs[:256]]
    tiles = np.stack([sample[k % len(sample)] for k in range(512)])
    for p, ms in models.items():
        m = ms[entry.stage_name]
        for fmt, pool in (("uint8", m.preprocess(tiles)), ("float32", m._normalise(tiles))):
            for bs in b.a.batches:
                if not b.time_left(f"infer {entry.id} {p} {fmt} batch {bs}"):
                    return
                m.raw(pool[:bs])  # warm-up
                n = max(bs, min(1024, 8 * bs))
                secs = []
                for _ in range(b.a.repeat):
                    t = time.perf_counter()
                    for k in range(0, n, bs):
                        m.raw(pool[k % 512 : k % 512 + bs])
                    secs.append(time.perf_counter() - t)
                row = where | {"precision": p, "input": fmt, "batch": bs, "tiles": n}
                row |= {"tiles_per_s_max": round(n / min(secs))}
                row |= {"tiles_per_s_median": round(n / statistics.median(secs))}
                b.res["infer"].append(row)
                b.save(row)


def print_tables(res: dict[str, Any]) -> None:
    print(f"device: {res['device']}; torch {res['torch']}; {res['cpu_cores']} CPU cores")
    print("| model | slide | µm/px | part | precision | batch | readers | tiles | s (min / median) | tiles/s | "
          "outside inference | labels as fp32 | Dice min |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["e2e"]:
        print(
            f"| {r['model']} | {r['slide']} | {r['mpp']:g} | {r['part']} | {r['precision']} | {r['batch']} | "
            f"{r['readers']} | {r['tiles']} | {r['seconds_min']:.2f} / {r['seconds_median']:.2f} | "
            f"{r['tiles_per_s_max']} | {r['share_outside_inference']:.0%} | {r['labels_as_torch_fp32']} | "
            f"{r['dice_min_vs_torch_fp32']} |"
        )
    for r in res["cpu"]:
        print(f"- CPU {r['model']} {r['slide']}: {r['engine']} {r['seconds']:.2f} s, labels as torch fp32 (GPU) "
              f"{r['labels_torch_fp32_gpu_vs_onnxruntime_fp32_cpu']}, Dice min {r['dice_min']}")  # fmt: skip
    for r in res["infer"]:
        print(f"- infer {r['model']} {r['precision']} {r['input']} batch {r['batch']}: {r['tiles_per_s_max']} tiles/s")
    if res["skipped"]:
        print(f"skipped at the deadline: {res['skipped']}")
    if res["failed"]:
        print(f"failed: {res['failed']}")


if __name__ == "__main__":
    raise SystemExit(main())

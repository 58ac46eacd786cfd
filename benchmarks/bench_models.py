"""Every registered model through `zoo run`, beside FAST running the model's own exported pipeline, in one run.

    python benchmarks/bench_models.py [--models NAME ...] [--repeat 3]   # -> benchmarks/results/bench_models.json

Each model runs on a slide where it does real work: the tissue models on the 254-megapixel TCGA mosaic
(``make_big_slide.py``), the tumour and multi-class models on a 4096 px slide of real lymph-node tissue with
tumour and normal regions (``make_lymph_node_slide.py``; the shared slides hold no lymph node). For each
model (the newest version of each name unless ``--models`` names others), each in its own process:

* ``zoo run`` with ``--engine auto`` (what a user gets here: after one untimed run, so the engine check is
  remembered as on a user's second run; and again with ``ZOO_CHECK_CACHE=0``, checked afresh) and with
  ``--engine onnxruntime --precision fp32`` (the reference), ``--repeat`` times each: wall time of the
  whole command (min and median), the job's own seconds, tiles and tiles/s, the share of the job's time
  outside inference, peak RSS;
* the label agreement of ``auto``'s mask with fp32's: the fraction of mask pixels with the same label;
* FAST (pyfast) on the kept ``pipelines/<name>_export.fpl`` on the same slide (not for multi-input models,
  which FAST cannot feed), and zoo/FAST;
* for a patch classifier whose tiles overlap (FAST's PatchStitcher cannot stitch overlapping vectors, so its
  pipeline does not overlap): ``zoo run`` again at FAST's tiling, from a registry copy with ``overlap: 0``,
  so that zoo/FAST also compares equal work.

The load average before and after is recorded (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_big_slide import make_big_slide  # noqa: E402
from make_colon_slide import make_colon_slide  # noqa: E402
from make_lymph_node_slide import make_lymph_node_slide  # noqa: E402

from zoo.registry import ModelEntry, load_registry  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


#: a row's timed runs (kept out of the one-line progress print)
SUB_ROWS = ("auto", "fp32", "auto_fast_tiling", "auto_fresh_checks")


def slide_for(entry: ModelEntry) -> Path:
    """Tissue models: the TCGA mosaic; a colorectal model: the EBHI-Seg mosaic; tumour and other multi-class
    models: the lymph-node slide."""
    if entry.task == "tissue-segmentation":
        return make_big_slide(SHARED / "slides/tcga-cr-7395-01a-01-ts1.svs", RESULTS / "big_mosaic.tiff")
    if "colorectal" in str(entry.provenance.get("domain", "")):
        return make_colon_slide(RESULTS / "colon.tiff")
    return make_lymph_node_slide(RESULTS / "lymph_node.tiff")


def inference_seconds(stats: dict[str, Any]) -> float:
    """The engine's seconds in a run.json's ``stats`` (every stage of a cascade)."""
    if "stages" in stats:
        return sum(inference_seconds(s) for s in stats["stages"].values())
    if "seconds_inference" in stats:
        return float(stats["seconds_inference"])
    if "seconds_breakdown" in stats:
        return float(stats["seconds_breakdown"].get("inference", 0.0))
    return float(stats.get("seconds", stats.get("seconds_total", 0.0)))  # a whole-slide network: one call


def zoo_run(
    model: str, slide: Path, out: Path, engine: list[str], registry: Path | None = None, fresh: bool = False
) -> dict[str, Any]:
    """One `zoo run` in its own process: wall seconds, run.json's figures, the label mask's path (``fresh``:
    with ``ZOO_CHECK_CACHE=0``, the engine checked afresh as on a first run)."""
    chosen = ["--registry", str(registry)] if registry else []
    cmd = [sys.executable, "-m", "zoo.cli", *chosen, "run", model, str(slide), "--out", str(out), "--json",
           "--no-progress", "--force", "--format", "tiff", *engine]  # fmt: skip
    t = time.perf_counter()
    env = {**os.environ, "ZOO_CHECK_CACHE": "0"} if fresh else None
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"zoo run {model}: {r.stderr.strip()[-500:]}")
    res = json.loads(r.stdout)[0]
    info = json.loads((Path(res["out"]) / "run.json").read_text())
    job, infer = float(info["seconds"]), inference_seconds(info["stats"])
    tiles = info["stats"].get("tiles_run") or 0
    return {
        "wall_seconds": wall, "job_seconds": job, "inference_seconds": infer,
        "outside_inference_share": round(1 - infer / job, 4) if job else None,
        "tiles": tiles, "tiles_per_second": round(tiles / job, 1) if job else None,
        "peak_rss_mb": res["summary"]["peak_rss_mb"], "engine": res["summary"]["engine"],
        "mask": str(Path(res["out"]) / "mask.tiff"),
    }  # fmt: skip


def repeated(
    model: str,
    slide: Path,
    out: Path,
    engine: list[str],
    repeat: int,
    registry: Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    runs = [zoo_run(model, slide, out, engine, registry, fresh) for _ in range(repeat)]
    walls = [r["wall_seconds"] for r in runs]
    best = min(runs, key=lambda r: r["wall_seconds"])
    return {**best, "wall_seconds_min": round(min(walls), 3), "wall_seconds_median": round(statistics.median(walls), 3),
            "wall_seconds_all": [round(w, 3) for w in walls]}  # fmt: skip


def fast_tiling_registry(entry: ModelEntry, work: Path) -> Path | None:
    """A registry holding only ``entry`` with FAST's tiling (no overlap), beside a copy of its folder: the same
    work as FAST's pipeline, which cannot stitch overlapping classification vectors. None when the entry's
    tiles do not overlap (FAST's tiling already)."""
    import shutil

    import yaml

    if entry.kind != "patch-classification" or not entry.input.overlap:  # FAST's segmentation pipelines overlap
        return None
    reg = load_registry()
    data = yaml.safe_load(reg.path.read_text(encoding="utf-8"))
    model = next(m for m in data["models"] if (m["name"], m["version"]) == (entry.name, entry.version))
    model["input"]["overlap"] = 0.0
    dest = work / f"fast-tiling-{entry.name}"
    folders = {Path(u).parent for u in [entry.weights.uri, *(s.weights.uri for s in entry.precisions.values()
                                                               if s.weights)]}  # fmt: skip
    for folder in folders:
        shutil.copytree(reg.root / folder, dest / folder, dirs_exist_ok=True)
    (dest / "registry.yaml").write_text(
        yaml.safe_dump({**data, "default_model": entry.name, "models": [model]}, sort_keys=False), encoding="utf-8"
    )
    return dest / "registry.yaml"


def agreement(a: str, b: str) -> float:
    from zoo.outputs import read_mask_tiff

    ma, mb = read_mask_tiff(Path(a))[0], read_mask_tiff(Path(b))[0]
    return round(float((ma == mb).mean()), 6) if ma.shape == mb.shape else 0.0


def fast_run(entry: ModelEntry, slide: Path, work: Path) -> dict[str, Any]:
    from zoo.errors import FplError
    from zoo.fastrun import fast_available, run_fast_pipeline_stats

    reason = fast_available()
    if reason or entry.context_inputs:
        return {"skipped": reason or "FAST cannot feed a tile with a centred context tile (multi-input)"}
    fpl = REPO / "pipelines" / f"{entry.name}_export.fpl"
    text = fpl.read_text(encoding="utf-8")
    # ImageFileExporter writes what its name's suffix says (a whole-slide model's small mask: PNG)
    suffix = ".mhd" if entry.kind in ("patch-classification", "cascade") else ".tiff"
    suffix = ".png" if "ImageFileExporter" in text else suffix
    try:
        return run_fast_pipeline_stats(fpl, {"wsi": str(slide), "output": str(work / f"fast-{entry.name}{suffix}")})
    except FplError as err:
        return {"error": str(err)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="NAME[@VERSION] (default: the newest of every name)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each zoo command (min and median)")
    ap.add_argument("--no-fast", action="store_true", help="skip FAST")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_models.json")
    a = ap.parse_args()
    reg = load_registry()
    names = a.models or list(dict.fromkeys(m.name for m in reg.models))
    res: dict[str, Any] = {
        "command": "python benchmarks/bench_models.py " + " ".join(sys.argv[1:]),
        "cpu_cores": os.cpu_count(), "load_average_before": os.getloadavg(), "models": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            entry = reg.get(name)
            slide = slide_for(entry)
            row: dict[str, Any] = {"kind": entry.kind, "slide": slide.name}
            zoo_run(entry.id, slide, work / "auto", [])  # the engine check, remembered (as after a first run)
            row["auto"] = repeated(entry.id, slide, work / "auto", [], a.repeat)
            row["auto_fresh_checks"] = repeated(entry.id, slide, work / "auto", [], a.repeat, fresh=True)
            row["fp32"] = repeated(entry.id, slide, work / "fp32", ["--engine", "onnxruntime", "--precision", "fp32"],
                                   a.repeat)  # fmt: skip
            row["label_agreement_auto_vs_fp32"] = agreement(row["auto"]["mask"], row["fp32"]["mask"])
            equal = fast_tiling_registry(entry, work)
            if equal is not None:  # zoo at FAST's tiling: the same tiles as FAST's pipeline
                row["auto_fast_tiling"] = repeated(entry.id, slide, work / "equal", [], a.repeat, equal)
            if not a.no_fast:
                row["fast"] = fast_run(entry, slide, work)
                if "seconds" in row["fast"]:
                    row["zoo_over_fast"] = round(row["auto"]["wall_seconds_min"] / row["fast"]["seconds"], 3)
                    if equal is not None:
                        row["zoo_over_fast_same_tiling"] = round(
                            row["auto_fast_tiling"]["wall_seconds_min"] / row["fast"]["seconds"], 3
                        )
            res["models"][entry.id] = row
            print(entry.id, json.dumps({k: v for k, v in row.items() if k not in SUB_ROWS}),
                  json.dumps({k: row["auto"][k] for k in ("engine", "wall_seconds_min", "wall_seconds_median",
                                                         "tiles", "outside_inference_share", "peak_rss_mb")}),
                  flush=True)  # fmt: skip
    res["load_average_after"] = os.getloadavg()
    a.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return 0


def _fast_cell(fa: dict[str, Any]) -> str:
    """FAST's seconds, or why there are none."""
    if "seconds" in fa:
        return f"{fa['seconds']:.2f}"
    return str(fa.get("skipped", fa.get("error", "")))


def markdown(res: dict[str, Any]) -> str:
    lines = [f"`{res['command']}`; load average {res['load_average_before']} -> {res['load_average_after']}", "",
             "| model | slide | engine (auto) | tiles | zoo s (min / median) | tiles/s | outside inference "
             "| peak RSS MB | fp32 s (min) | labels as fp32 | FAST s | zoo s / FAST s |",
             "|---" * 12 + "|"]  # fmt: skip
    for mid, r in res["models"].items():
        au, fp, fa = r["auto"], r["fp32"], r.get("fast", {})
        lines.append(
            f"| {mid} | {r['slide']} | {au['engine']} | {au['tiles']} | {au['wall_seconds_min']:.2f} / "
            f"{au['wall_seconds_median']:.2f} | {au['tiles_per_second']} | {au['outside_inference_share']:.0%} | "
            f"{au['peak_rss_mb']:.0f} | {fp['wall_seconds_min']:.2f} | {r['label_agreement_auto_vs_fp32']} | "
            f"{_fast_cell(fa)} | {r.get('zoo_over_fast', '')} |"
        )
    for mid, r in res["models"].items():
        if "auto_fresh_checks" in r:
            fr = r["auto_fresh_checks"]
            lines.append(f"\n{mid} checking its engine afresh (a first run; ZOO_CHECK_CACHE=0): "
                         f"{fr['wall_seconds_min']:.2f} / {fr['wall_seconds_median']:.2f} s")  # fmt: skip
        if "auto_fast_tiling" in r:
            eq = r["auto_fast_tiling"]
            lines.append(
                f"\n{mid} at FAST's tiling (no overlap, the same tiles as FAST's pipeline): {eq['tiles']} tiles, "
                f"{eq['wall_seconds_min']:.2f} / {eq['wall_seconds_median']:.2f} s, zoo/FAST "
                f"{r.get('zoo_over_fast_same_tiling', '-')}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

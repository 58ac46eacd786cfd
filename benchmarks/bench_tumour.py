"""Per-stage speed of tumour-tiles and tumour-h2g beside FAST running the same ONNX pipeline, one run.

On the 254-megapixel benchmark mosaic (benchmarks/make_big_slide.py; 4x4 CMU-1-Small-Region at
0.5 um/px) both models run at their 0.972 um/px. Each `zoo run` is its own process (peak RSS from
the OS); FAST runs the kept ``pipelines/<model>_export.fpl`` in pyfast. Repeats report min and
median; the load average is recorded (the machine is shared).

    python benchmarks/bench_tumour.py --repeat 3      # -> benchmarks/results/bench_tumour.json
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.make_big_slide import make_big_slide  # noqa: E402
from zoo.fastrun import read_metaimage, run_fast_pipeline_stats  # noqa: E402

#: Seed 004 Table 3: Mob-PW-UNet on a representative x400 WSI, OpenVINO on a 32-core Xeon Silver (CPU).
PAPER_SECONDS_32_CORES = {"patches": 57.32, "refine": 0.75, "total": 58.07}


def zoo_run(model: str, slide: Path, out: Path) -> dict[str, object]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            "/usr/bin/time",
            "-f",
            "MAXRSS_KB %M",
            sys.executable,
            "-m",
            "zoo.cli",
            "run",
            model,
            str(slide),
            "--out",
            str(out),
            "--no-progress",
            "--force",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"zoo run {model} failed: {r.stderr.strip().splitlines()[-1]}")
    rss = [int(ln.split()[1]) / 1024 for ln in r.stderr.splitlines() if ln.startswith("MAXRSS_KB ")]
    run = json.loads((out / slide.stem / "run.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": rss[-1] if rss else None, "run": run}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--slide", type=Path, default=REPO / "zoo/data/cmu-1-small-region.svs", help="mosaic source")
    ap.add_argument("--models", nargs="+", default=["tumour-tiles", "tumour-h2g"], help="registered models")
    ap.add_argument("--repeat", type=int, default=3, help="runs per model (min and median reported)")
    ap.add_argument("--no-fast", action="store_true", help="skip FAST")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_tumour.json", help="results file")
    a = ap.parse_args()
    big = make_big_slide(a.slide, REPO / "benchmarks/results/big_mosaic.tiff")
    results: dict[str, object] = {
        "slide": str(big),
        "load_average_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "paper_reference_seconds_32_core_xeon": PAPER_SECONDS_32_CORES,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            runs = [zoo_run(model, big, Path(tmp) / model) for _ in range(a.repeat)]
            walls = [float(r["wall_s"]) for r in runs]  # type: ignore[arg-type]
            stats = runs[-1]["run"]["stats"]  # type: ignore[index]
            per_stage = stats.get("seconds_per_stage") or {"patches": stats["seconds_total"]}
            tiles = int(stats["tiles_run"])
            row: dict[str, object] = {
                "wall_s_min": round(min(walls), 2),
                "wall_s_median": round(statistics.median(walls), 2),
                "peak_rss_mb": round(max(float(r["peak_rss_mb"] or 0) for r in runs), 1),
                "seconds_per_stage_last_run": per_stage,
                "tiles_run": tiles,
                "tiles_total": stats["tiles_total"],
                "tiles_removed_by_premask": stats.get("tiles_removed_by_premask"),
                "tiles_removed_by_entropy_rails": stats.get("tiles_removed_by_entropy_rails"),
                "tiles_per_s_end_to_end": round(tiles / min(walls), 1),
                "breakdown_last_run": stats.get("seconds_breakdown") or stats["stages"]["patches"]["seconds_breakdown"],
                "engine": runs[-1]["run"]["engine"],  # type: ignore[index]
            }
            if not a.no_fast:
                from zoo.outputs import read_mask_tiff

                fpl = REPO / "pipelines" / f"{model}_export.fpl"
                fast_out = Path(tmp) / f"{model}-fast.mhd"
                fast = [
                    run_fast_pipeline_stats(fpl, {"wsi": str(big), "output": str(fast_out)}) for _ in range(a.repeat)
                ]
                fs = [f["seconds"] for f in fast]
                ours, _, _ = read_mask_tiff(Path(tmp) / model / big.stem / "mask.tiff")
                theirs = read_metaimage(fast_out)
                theirs = (theirs >= 0.5) if theirs.dtype.kind == "f" else theirs > 0
                from PIL import Image

                theirs = (
                    np.asarray(
                        Image.fromarray(theirs.astype(np.uint8)).resize(ours.shape[::-1], Image.Resampling.NEAREST)
                    )
                    > 0
                )
                inter = int((theirs & (ours > 0)).sum())
                dice = (
                    1.0
                    if not theirs.any() and not (ours > 0).any()
                    else 2 * inter / (int(theirs.sum()) + int((ours > 0).sum()))
                )
                row["fast"] = {
                    "seconds_min": round(min(fs), 2),
                    "seconds_median": round(statistics.median(fs), 2),
                    "peak_rss_mb": round(max(f["peak_rss_mb"] for f in fast), 1),
                    "zoo_over_fast_wall": round(min(walls) / min(fs), 3),
                    "dice_fast_vs_zoo": round(dice, 4),
                }
            results[model] = row
            print(json.dumps({model: row}, indent=1), flush=True)
    results["load_average_end"] = os.getloadavg()
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

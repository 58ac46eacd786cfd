"""Peak memory and time of `zoo run` on gigapixel slides (issue #10.4): memory must not grow with the slide.

    python benchmarks/bench_memory.py [--sizes 50000 100000 200000] [--mpp 2 1] [--model tissue-multires]

Slides are built cheaply: Aperio-layout pyramidal TIFFs (0.25 µm/px at level 0, levels at
downsample 1, 4, 16, 64, ... as Aperio writes them) whose 256 px tiles are a handful of
pre-encoded JPEG tiles repeated: real H&E tiles cut from the bundled CMU slide where a
pattern of ellipses says "tissue" (about 3 % of the slide, as in a sparse biopsy), a real
glass tile elsewhere. Writing a 200,000² px slide takes seconds and about 100 MB of disk.

Each `zoo run` (the whole job: runner, pyramidal mask TIFF, GeoJSON, run.json) runs in its
own process; its peak RSS is the run's own (``VmHWM``, in its summary). Prints a table and writes
``benchmarks/results/bench_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TILE = 256
MPP0 = 0.25


def _tissue_at(x0: np.ndarray, y0: np.ndarray, side: int) -> np.ndarray:
    """True where level-0 point (x0, y0) lies in one of the slide's tissue ellipses (~3 % of the area)."""
    u, v = x0 / side, y0 / side
    inside = np.zeros(np.broadcast(u, v).shape, bool)
    for cx, cy, rx, ry in ((0.3, 0.35, 0.08, 0.05), (0.62, 0.55, 0.05, 0.09), (0.45, 0.78, 0.06, 0.03)):
        inside |= ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1
    return inside


def make_slide(path: Path, side: int, dense: bool = False) -> Path:
    """An Aperio-layout pyramid of ``side``² px built from repeated pre-encoded JPEG tiles
    (``dense``: tissue everywhere, the worst case for throughput; else the sparse ellipses)."""
    import imagecodecs
    import tifffile

    from zoo.cli import bundled_slide
    from zoo.slide import open_slide

    if path.exists():
        return path
    with open_slide(bundled_slide()) as s:
        src = s.read_region((0, 0), 0, s.dimensions)
    tissue_tiles = [
        imagecodecs.jpeg8_encode(np.ascontiguousarray(src[y : y + TILE, x : x + TILE]), level=85)
        for y, x in ((1200, 800), (1500, 1000), (1800, 700), (2100, 1200))
    ]
    glass = imagecodecs.jpeg8_encode(np.ascontiguousarray(src[20 : 20 + TILE, 1900 : 1900 + TILE]), level=85)
    tmp = path.with_suffix(".partial.tiff")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        ds = 1
        while True:
            lw = lh = -(-side // ds)
            nx, ny = -(-lw // TILE), -(-lh // TILE)

            def tiles(ds: int = ds, nx: int = nx, ny: int = ny) -> Iterator[bytes]:
                for ty in range(ny):
                    cx = (np.arange(nx) + 0.5) * TILE * ds
                    cy = np.full(nx, (ty + 0.5) * TILE * ds)
                    inside = np.ones(nx, bool) if dense else _tissue_at(cx, cy, side)
                    for tx in range(nx):
                        yield tissue_tiles[(tx + ty) % len(tissue_tiles)] if inside[tx] else glass

            px_per_cm = 1e4 / (MPP0 * ds)
            head = f"Aperio Image Library v12.0.0 \r\n{side}x{side} ({TILE}x{TILE}) JPEG/RGB Q=85"
            desc = f"{head}|AppMag = 40|MPP = {MPP0}" if ds == 1 else f"{head} -> {lw}x{lh} JPEG/RGB Q=85"
            tif.write(
                tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
                description=desc,
            )
            if ds == 1:  # Aperio layout: a small stripped thumbnail is the second page
                f = -(-side // 768)
                ys = np.arange(0, side, f)
                inside_th = np.ones((len(ys), len(ys)), bool) if dense else _tissue_at(ys[None, :], ys[:, None], side)
                th = np.where(inside_th[..., None], 200, 242).astype(np.uint8)
                tif.write(
                    np.repeat(th, 3, axis=2),
                    photometric="rgb",
                    rowsperstrip=16,
                    subfiletype=0,
                    metadata=None,
                    description=f"Aperio Image Library v12.0.0 \n{side}x{side} -> {th.shape[1]}x{th.shape[0]} - ",
                )
            if lw // 4 < 1024:
                break
            ds *= 4
    tmp.replace(path)
    return path


def run_zoo(slide: Path, model: str, mpp: float, out: Path) -> dict[str, float | int | str]:
    """One `zoo run` in its own process: wall seconds and peak RSS (MB)."""
    cmd = [sys.executable, "-m", "zoo.cli", "run", model, str(slide), "--mpp", str(mpp), "--out", str(out)]
    cmd += ["--no-progress", "--force", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    _, status, _usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"zoo run failed on {slide}: {stderr.strip()}")
    res = json.loads(stdout)[0]
    run = json.loads((Path(res["out"]) / "run.json").read_text())
    return {
        "seconds": round(secs, 2),
        "peak_rss_mb": res["summary"]["peak_rss_mb"],  # the run's own VmHWM, not wait4's
        "tiles_run": run["stats"]["tiles_run"],
        "tiles_total": run["stats"]["tiles_total"],
        "mask_px": run["stats"]["model_dimensions_px"][0] * run["stats"]["model_dimensions_px"][1],
        "tissue_fraction": list(run["classes"].values())[1]["fraction"],
        "geojson_features": int(run["outputs"].get("geojson_features", 0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000], help="slide sides (px)")
    ap.add_argument("--mpp", type=float, nargs="+", default=[2.0, 1.0], help="µm/px to run at")
    ap.add_argument("--model", default="tissue-multires")
    ap.add_argument("--work", default=None, help="folder for the slides (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_memory.json"))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="zoo-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    head = f"{'slide px':>12} {'GB px':>6} {'µm/px':>6} {'mask MPx':>9} {'tiles':>13} {'seconds':>8}"
    print(f"{head} {'peak RSS MB':>12}")
    for side in a.sizes:
        t = time.perf_counter()
        slide = make_slide(work / f"mosaic-{side}.svs", side)
        made = time.perf_counter() - t
        for mpp in a.mpp:
            r = run_zoo(slide, a.model, mpp, work / "out")
            row = {"side_px": side, "gigapixels": side * side / 1e9, "mpp": mpp, "slide_write_s": round(made, 1), **r}
            rows.append(row)
            print(
                f"{side:>12,} {side * side / 1e9:>6.1f} {mpp:>6g} {r['mask_px'] / 1e6:>9.1f} "  # type: ignore[operator]
                f"{r['tiles_run']:>6}/{r['tiles_total']:<6} {r['seconds']:>8} {r['peak_rss_mb']:>12}",
                flush=True,
            )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"max peak RSS {max(r['peak_rss_mb'] for r in rows)} MB; written {a.out}")  # type: ignore[type-var]


if __name__ == "__main__":
    main()

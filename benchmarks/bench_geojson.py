"""Mask-to-GeoJSON cost on fragmented and smooth masks (issue #13): objects per second, seconds per megapixel.

    python benchmarks/bench_geojson.py [--repeat 3]

Masks: the 512² two-class checkerboard (131,072 one-pixel objects per class pair, the case that ran for
over 11 minutes before), noisy three-class predictions at 1024² and 2048² (what a multi-class model
looks like locally), the same noise with ``--min-area-um2``-style filtering, and large smooth blobs at
4096² and 8192². Each is converted with the project's defaults (``mask_to_feature_collection``) the
given number of times; min and median seconds are printed with objects/s and s/MPx, and the growth
from one size to the next shows whether the cost is linear. Writes
``benchmarks/results/bench_geojson.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge.geojson import ClassStyle, mask_to_feature_collection  # noqa: E402

CLASSES = [ClassStyle(1, "A", (255, 0, 0)), ClassStyle(2, "B", (0, 160, 0)), ClassStyle(3, "C", (0, 0, 255))]


def checkerboard(n: int) -> np.ndarray:
    return (np.indices((n, n)).sum(0) % 2).astype(np.uint8) + 1


def noisy(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 4, (n, n)).astype(np.uint8)


def blobs(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    field = ndi.gaussian_filter(rng.random((n // 8, n // 8)), 6)
    small = np.digitize(field, np.quantile(field, [0.4, 0.7, 0.9])).astype(np.uint8)
    return np.kron(small, np.ones((8, 8), np.uint8))


def bench(name: str, make: Callable[[], np.ndarray], repeat: int, min_area_px: float = 0.0) -> dict[str, object]:
    mask = make()
    times, n_obj = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        fc = mask_to_feature_collection(mask, CLASSES, 1.0, mpp0=1.0, simplify_um=0.0, min_area_um2=min_area_px)
        times.append(time.perf_counter() - t)
        n_obj = len(fc["features"])
    mpx = mask.size / 1e6
    best, med = min(times), statistics.median(times)
    row = {
        "mask": name,
        "megapixels": round(mpx, 3),
        "objects": n_obj,
        "seconds_min": round(best, 3),
        "seconds_median": round(med, 3),
        "objects_per_s": round(n_obj / med),
        "seconds_per_mpx": round(med / mpx, 3),
    }
    print(
        f"{name:<34} {mpx:>7.2f} MPx {n_obj:>9,} objects  min {best:7.2f} s  median {med:7.2f} s  "
        f"{row['objects_per_s']:>9,} obj/s  {row['seconds_per_mpx']:>7.3f} s/MPx",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_geojson.json"))
    a = ap.parse_args()
    rows = [
        bench("checkerboard 512", lambda: checkerboard(512), a.repeat),
        bench("checkerboard 1024", lambda: checkerboard(1024), a.repeat),
        bench("noisy 3 classes 1024", lambda: noisy(1024), a.repeat),
        bench("noisy 3 classes 2048", lambda: noisy(2048), a.repeat),
        bench("noisy 2048, objects < 20 px dropped", lambda: noisy(2048), a.repeat, min_area_px=20.0),
        bench("smooth blobs 4096", lambda: blobs(4096), a.repeat),
        bench("smooth blobs 8192", lambda: blobs(8192), a.repeat),
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"repeat": a.repeat, "rows": rows}, indent=2))
    print(f"written {a.out}")


if __name__ == "__main__":
    main()

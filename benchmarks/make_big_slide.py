"""Write a large pyramidal JPEG TIFF (an n x n mosaic of a real slide's level 0) for memory benchmarks.

    python benchmarks/make_big_slide.py SLIDE OUT.tiff [N]

Levels are successive tiled pages (OpenSlide's generic tiled TIFF, also read by tifffile),
written tile by tile from an iterator, so writing it needs memory for the source only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_big_slide(src: Path, out: Path, n: int = 4, tile: int = 256, mpp: float = 0.5) -> Path:
    import tifffile

    from zoo.slide import open_slide

    if out.exists():
        return out
    with open_slide(src) as s:
        w, h = s.dimensions
        base = s.read_region((0, 0), 0, (w, h))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tiff")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        level, k = base, 0
        while True:
            lh, lw = level.shape[0] * n, level.shape[1] * n

            def tiles(img: np.ndarray = level, lh: int = lh, lw: int = lw) -> Iterator[np.ndarray]:
                ih, iw = img.shape[:2]
                for ty in range(0, lh, tile):
                    for tx in range(0, lw, tile):
                        ys = np.arange(ty, ty + tile) % ih
                        xs = np.arange(tx, tx + tile) % iw
                        t = img[ys][:, xs]
                        if ty + tile > lh or tx + tile > lw:  # pad beyond the image with white
                            t = t.copy()
                            t[max(0, lh - ty) :, :] = 255
                            t[:, max(0, lw - tx) :] = 255
                        yield t

            px_per_cm = 1e4 / (mpp * 2**k)
            # Aperio-style description so OpenSlide (and FAST through it) see objective power and µm/px.
            if k == 0:
                w0, h0 = lw, lh
                desc = (
                    f"Aperio Image Library v12.0.0 \r\n{lw}x{lh} ({tile}x{tile}) JPEG/RGB Q=90"
                    f"|AppMag = {round(10 / mpp)}|MPP = {mpp}"
                )
            else:
                desc = f"Aperio Image Library v12.0.0 \r\n{w0}x{h0} ({tile}x{tile}) -> {lw}x{lh} JPEG/RGB Q=90"
            tif.write(
                tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0,  # Aperio marks levels as full images, not reduced ones
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                metadata=None,
                description=desc,
            )
            if k == 0:  # Aperio layout: a small stripped thumbnail is the second page
                f = max(1, int(np.ceil(max(base.shape[:2]) * n / 1024)))
                thumb = np.tile(base[::f, ::f], (n, n, 1))[: lh // f, : lw // f]
                tif.write(
                    thumb,
                    compression="jpeg",
                    photometric="rgb",
                    rowsperstrip=16,
                    subfiletype=0,
                    metadata=None,
                    description=f"Aperio Image Library v12.0.0 \n{lw}x{lh} -> {thumb.shape[1]}x{thumb.shape[0]} - ",
                )
            if min(lh, lw) // 2 < 2048:
                break
            even = level[: level.shape[0] // 2 * 2, : level.shape[1] // 2 * 2]
            level = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
            k += 1
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(make_big_slide(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4))

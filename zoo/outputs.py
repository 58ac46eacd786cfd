"""Writing results: pyramidal TIFF masks and JSON, always through a temporary name.

Masks are written as tiled, deflate-compressed, 8-bit label TIFFs whose pyramid
levels are successive pages (OpenSlide's "generic tiled TIFF", also read by QuPath
and tifffile), with the resolution tags set in pixels per centimetre.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import OutputError


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; rename it onto ``dest`` only on success.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
    except OSError as err:
        raise OutputError(f"{dest.parent}: cannot write here ({err.strerror}); choose a writable --out folder") from err
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~current_umask())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(dest: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def write_mask_tiff(
    dest: Path,
    mask: np.ndarray,
    mpp: float | None,
    tile_px: int = 256,
    min_level_side_px: int = 256,
    colormap: dict[int, tuple[int, int, int]] | None = None,
    description: str = "",
) -> int:
    """Write a uint8 label mask as a tiled pyramidal TIFF; return the number of levels.

    Args:
        dest: output path (written as ``.<name>.*.partial`` first).
        mask: (height, width) uint8 class indices.
        mpp: µm per pixel of ``mask`` (level 0 of the TIFF), or None.
        tile_px: tile side in pixels.
        min_level_side_px: stop adding levels when the short side would be below this.
        colormap: class index -> RGB, stored as a TIFF palette so viewers show colours.
        description: ImageDescription of the first page (e.g. JSON with the model id).
    """
    import tifffile

    levels = [mask]
    while min(levels[-1].shape) // 2 >= min_level_side_px:
        levels.append(levels[-1][::2, ::2])  # nearest: label values must not mix
    cmap = None
    if colormap:
        cmap = np.zeros((3, 256), np.uint16)
        for idx, rgb in colormap.items():
            cmap[:, idx] = np.asarray(rgb, np.uint16) * 257
    with atomic_path(dest) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=mask.size > 2**31) as tif:
            for k, lvl in enumerate(levels):
                kw: dict[str, Any] = {}
                if mpp:
                    px_per_cm = 1e4 / (mpp * 2**k)
                    kw.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                tif.write(
                    np.ascontiguousarray(lvl),
                    tile=(tile_px, tile_px),
                    compression="zlib",
                    photometric="palette" if cmap is not None else "minisblack",
                    colormap=cmap,
                    subfiletype=0 if k == 0 else 1,
                    description=description if k == 0 else None,
                    metadata=None,
                    **kw,
                )
    return len(levels)


def read_mask_tiff(path: Path) -> tuple[np.ndarray, float | None, dict[str, Any]]:
    """Level 0 of a mask TIFF, its µm/px (or None) and the JSON metadata in its description.

    Raises:
        OutputError: the file is missing or not a single-channel mask.
    """
    import tifffile

    from zoo.slide import tiff_resolution

    try:
        with tifffile.TiffFile(path) as tif:
            arr = tif.pages[0].asarray()
            mpp, _ = tiff_resolution(tif)
            desc = getattr(tif.pages[0], "description", "") or ""
    except (OSError, tifffile.TiffFileError, ValueError) as err:
        raise OutputError(f"{path}: not a readable mask TIFF ({err}); pass a mask written by `zoo run`") from err
    if arr.ndim != 2:
        raise OutputError(f"{path}: expected a single-channel label mask, got shape {arr.shape}; pass a label mask")
    try:
        meta = json.loads(desc) if desc.startswith("{") else {}
    except json.JSONDecodeError:
        meta = {}
    return arr.astype(np.uint8), mpp, meta

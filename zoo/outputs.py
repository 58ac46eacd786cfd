"""Writing results: pyramidal TIFF masks and JSON, always through a temporary name.

Masks are written as tiled, deflate-compressed, 8-bit label TIFFs whose pyramid
levels are successive pages (OpenSlide's "generic tiled TIFF", also read by QuPath
and tifffile), with the resolution tags set in pixels per centimetre.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import OutputError, OutputExistsError
from zoo.labelmask import RowSource, as_rows


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (same path once resolved, or hard links of one inode)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):
        return False


def guard_outputs(outputs: list[Path], inputs: list[Path], force: bool) -> list[Path]:
    """Check, before anything is written, that no output is one of the command's ``inputs`` and that none
    exists already unless ``force``; return the existing outputs that ``force`` will replace.

    Raises:
        OutputExistsError: an output is an input (never allowed, even with ``force``), or it exists and
            ``force`` is off; the message names the file and the fix.
    """
    for out in outputs:
        for src in inputs:
            if _same_file(out, src):
                raise OutputExistsError(
                    f"{out}: is an input of this command ({src}); it is never overwritten: choose another --out"
                )
        if out.is_dir():
            raise OutputError(f"{out}: is a folder; give a file name to write to")
    replaced = [o for o in outputs if o.exists() or o.is_symlink()]
    if replaced and not force:
        raise OutputExistsError(f"{replaced[0]}: exists already; choose another --out, or pass --force to replace it")
    return replaced


@contextlib.contextmanager
def atomic_path(dest: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``dest``; rename it onto ``dest`` only on success.

    ``overwrite=False``: the file is linked into place only if nothing has appeared at ``dest`` meanwhile
    (no check-then-write race).

    Raises:
        OutputError: ``dest`` is a folder, or it cannot be written (no permission, no space left).
        OutputExistsError: ``overwrite`` is off and ``dest`` exists.
    """
    if dest.is_dir():
        raise OutputError(f"{dest}: is a folder; give a file name to write to")
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
        if overwrite:
            tmp.replace(dest)
        else:
            try:
                os.link(tmp, dest)  # fails if dest exists: never replaces what appeared meanwhile
            except FileExistsError as err:
                raise OutputExistsError(
                    f"{dest}: appeared while it was being written; nothing was replaced: choose another --out"
                ) from err
    except OSError as err:
        if isinstance(err, (OutputError, OutputExistsError)):
            raise
        why = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise OutputError(f"{dest}: cannot write ({why}); free space or choose another output path") from err
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(dest: Path, obj: Any, overwrite: bool = True) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (``overwrite``: see :func:`atomic_path`)."""
    with atomic_path(dest, overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def write_mask_tiff(
    dest: Path,
    mask: np.ndarray | RowSource,
    mpp: float | None,
    tile_px: int = 256,
    min_level_side_px: int = 256,
    colormap: dict[int, tuple[int, int, int]] | None = None,
    description: str = "",
    overwrite: bool = True,
) -> int:
    """Write a uint8 label mask as a tiled pyramidal TIFF; return the number of levels.

    Tiles are produced one row of tiles at a time from ``mask`` (an array or a
    :class:`zoo.labelmask.LabelMask` on disk), so memory is one row of tiles whatever
    the mask's size. Level k is level 0 sampled every 2**k pixels (nearest: label
    values must not mix).

    Args:
        dest: output path (written as ``.<name>.*.partial`` first).
        mask: (height, width) uint8 class indices.
        mpp: µm per pixel of ``mask`` (level 0 of the TIFF), or None.
        tile_px: tile side in pixels.
        min_level_side_px: stop adding levels when the short side would be below this.
        colormap: class index -> RGB, stored as a TIFF palette so viewers show colours.
        description: ImageDescription of the first page (e.g. JSON with the model id).
        overwrite: replace an existing ``dest`` (see :func:`atomic_path`).
    """
    import tifffile

    src = as_rows(mask)
    h0, w0 = src.shape
    shapes = [(h0, w0)]
    while min(shapes[-1]) // 2 >= min_level_side_px:
        k = len(shapes)
        shapes.append((-(-h0 // 2**k), -(-w0 // 2**k)))
    cmap = None
    if colormap:
        cmap = np.zeros((3, 256), np.uint16)
        for idx, rgb in colormap.items():
            cmap[:, idx] = np.asarray(rgb, np.uint16) * 257
    with atomic_path(dest, overwrite) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=h0 * w0 > 2**31) as tif:
            for k, shape in enumerate(shapes):
                kw: dict[str, Any] = {}
                if mpp:
                    px_per_cm = 1e4 / (mpp * 2**k)
                    kw.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                tif.write(
                    _tiles(src, 2**k, shape, tile_px),
                    shape=shape,
                    dtype=np.uint8,
                    tile=(tile_px, tile_px),
                    compression="zlib",
                    photometric="palette" if cmap is not None else "minisblack",
                    colormap=cmap,
                    subfiletype=0 if k == 0 else 1,
                    description=description if k == 0 else None,
                    metadata=None,
                    **kw,
                )
    return len(shapes)


def _tiles(src: RowSource, step: int, shape: tuple[int, int], tile_px: int) -> Iterator[np.ndarray]:
    """Row-major (tile_px, tile_px) tiles of ``src`` sampled every ``step`` pixels, zero-padded."""
    h, w = shape
    for ty in range(0, h, tile_px):
        band = src.read_rows(ty * step, min(src.shape[0], (ty + tile_px) * step), step)[:, ::step]
        for tx in range(0, w, tile_px):
            t = band[:, tx : tx + tile_px]
            if t.shape != (tile_px, tile_px):
                t = np.pad(t, ((0, tile_px - t.shape[0]), (0, tile_px - t.shape[1])))
            yield np.ascontiguousarray(t)


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
            mpp, _, _ = tiff_resolution(tif)
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

"""Slide I/O: one reader interface over OpenSlide and tifffile.

Coordinates are (x, y) in level-0 pixels unless a name says otherwise; sizes are
(width, height). Regions are read lazily (OpenSlide tiles, or the TIFF's own tiles
decoded one by one by :class:`TiffSlide`), never a whole level-0 image. A tile that
cannot be decoded raises :class:`zoo.errors.BadTileError` naming it (or, with
``on_bad_tile="skip"``, reads as glass and is listed in ``Slide.bad_tiles``).
"""

from __future__ import annotations

import math
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zoo.errors import BadTileError, SlideLevelError, SlideMppConflictError, SlideOpenError

Backend = Literal["auto", "openslide", "tifffile"]
BadTilePolicy = Literal["fail", "skip"]
BACKENDS: tuple[str, ...] = ("openslide", "tifffile")

#: Suffixes OpenSlide reads that tifffile does not (or reads without their pyramid metadata).
_OPENSLIDE_ONLY = {".mrxs", ".vms", ".vmu", ".ndpi", ".scn", ".bif", ".svslide", ".dcm"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".qptiff"}


class Slide:
    """A pyramidal whole-slide image.

    Attributes:
        path: the file.
        backend: ``"openslide"`` or ``"tifffile"``.
        level_dimensions: (width, height) in pixels of each level.
        level_downsamples: level-0 pixels per level pixel, per level.
        mpp: level-0 µm per pixel (mean of x and y), or None if the file has none.
        objective_power: scanner objective (e.g. 20.0), or None.
    """

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    #: why the file's resolution was not used (malformed or zero), or None
    mpp_note: str | None = None
    #: tiles that failed to decode and were skipped (``on_bad_tile="skip"``), in the order met
    bad_tiles: list[dict[str, Any]]
    on_bad_tile: BadTilePolicy = "fail"

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """Read an RGB uint8 array of shape (height, width, 3).

        Args:
            location_px: top-left (x, y) in level-0 pixels.
            level: pyramid level.
            size_px: (width, height) in pixels of ``level``.

        Pixels outside the slide are white (255).
        """
        raise NotImplementedError

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel at ``level``, or None when the slide has no resolution."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (for ``run.json`` and ``--json`` output)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "level_dimensions_px": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_note": self.mpp_note,
            "objective_power": self.objective_power,
        }


def _white_pad(region: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Place ``region`` (read from clipped coordinates) into a white (h, w, 3) canvas."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    rh, rw = region.shape[:2]
    out[y0 : y0 + rh, x0 : x0 + rw] = region[..., :3]
    return out


class OpenSlideSlide(Slide):
    """Every vendor format OpenSlide reads (Aperio, Hamamatsu, MIRAX, generic tiled TIFF, ...)."""

    backend = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        self.bad_tiles = []
        try:
            self._osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            e = SlideOpenError(
                f"{path}: OpenSlide cannot read this file ({err}); check that it is a complete, "
                "uncorrupted slide, or try --backend tifffile for generic/OME TIFF"
            )
            e.reason = str(err)
            raise e from err
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)  # type: ignore[misc]
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        props = self._osr.properties
        mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        self.mpp, self.mpp_note = _mean_mpp(mx, my)
        self.objective_power = _positive(props.get("openslide.objective-power"))

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        try:
            rgba = np.asarray(self._osr.read_region(location_px, level, size_px))
        except Exception as err:  # openslide raises its own error type on a bad tile
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadTileError(
                f"{self.path}: cannot decode the region at level-0 {location_px}, level {level} ({reason}); "
                "the slide is damaged: re-scan or re-copy it (with --backend tifffile, --on-bad-tile skip "
                "can mask damaged tiles of TIFF slides)",
                reason,
            ) from err
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # transparent (outside the scanned area) is glass
        return rgb

    def close(self) -> None:
        self._osr.close()


class TiffSlide(Slide):
    """Generic, OME and Aperio pyramidal TIFF, and plain (stripped, single-level) TIFF, via tifffile.

    Tiles (or strips) are read from the file and decoded one by one, so that a tile that
    fails to decode is named: JPEG through libjpeg-turbo in strict mode (``simplejpeg``:
    a decoder warning such as "Corrupt JPEG data" is an error, as in OpenSlide), other
    codecs through tifffile/imagecodecs. Decoded tiles are kept in a small LRU cache
    (``cache_bytes``) because overlapping model tiles read the same slide tiles.
    """

    backend = "tifffile"

    def __init__(self, path: Path, on_bad_tile: BadTilePolicy = "fail", cache_bytes: int = 96 << 20) -> None:
        import tifffile

        self.path = path
        self.on_bad_tile = on_bad_tile
        self.bad_tiles: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        try:
            self._tif = tifffile.TiffFile(str(path))
        except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, struct.error) as err:
            e = SlideOpenError(
                f"{path}: tifffile cannot read this file ({err}); check that it is a complete TIFF/SVS slide"
            )
            e.reason = str(err)
            raise e from err
        try:
            self._levels = self._read_levels(path)
            self.mpp, self.objective_power, self.mpp_note = tiff_resolution(self._tif)
        except SlideOpenError:
            self._tif.close()
            raise
        except (tifffile.TiffFileError, ValueError, OSError, KeyError, IndexError, struct.error) as err:
            self._tif.close()
            e = SlideOpenError(
                f"{path}: tifffile cannot read this file ({err}); check that it is a complete TIFF/SVS slide"
            )
            e.reason = str(err)
            raise e from err
        self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    def _read_levels(self, path: Path) -> list[_TiffLevel]:
        series = self._tif.series
        if not series:
            raise ValueError("no image series")
        base = series[0]
        # tifffile groups SVS/OME/SubIFD pyramids and generic page pyramids into series[0].levels;
        # other series are associated images (thumbnail, label, macro), never levels.
        size = path.stat().st_size
        levels = []
        for lvl in base.levels:
            if len(lvl.pages) != 1 or lvl.keyframe is None:
                raise ValueError(f"a level of {len(lvl.pages)} pages (planes or channels as pages)")
            level = _TiffLevel(lvl.keyframe, size, path)
            level.check_jpeg_colours(self._tif.filehandle)
            levels.append(level)
        levels.sort(key=lambda lv: -lv.width)  # some writers store thumbnails between levels
        return levels

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        x, y = round(location_px[0] / ds), round(location_px[1] / ds)
        w, h = size_px
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // lv.seg_h, (y1 - 1) // lv.seg_h + 1):
            for col in range(x0 // lv.seg_w, (x1 - 1) // lv.seg_w + 1):
                seg = self._segment(level, row, col)
                if seg is None:
                    continue  # sparse (never written) or skipped bad tile: glass
                sx, sy = col * lv.seg_w, row * lv.seg_h
                ax0, ay0 = max(x0, sx), max(y0, sy)
                ax1, ay1 = min(x1, sx + seg.shape[1], lv.width), min(y1, sy + seg.shape[0], lv.height)
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return out

    def _segment(self, level: int, row: int, col: int) -> np.ndarray | None:
        """Decoded RGB tile (row, col) of ``level``, cached; None for a sparse or skipped tile."""
        lv = self._levels[level]
        index = row * lv.n_across + col
        key = (level, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            raw = lv.read(index, self._tif.filehandle)  # one shared file handle: seek + read under the lock
        try:
            # outside the lock: the decoders release the GIL, so reader threads decode in parallel
            seg = None if raw is None else lv.decode(raw, index)
        except BadTileError as err:
            if self.on_bad_tile != "skip":
                raise
            ds = self.level_downsamples[level]
            with self._lock:
                self.bad_tiles.append(
                    {
                        "level": level,
                        "tile_col_row": [col, row],
                        "level0_box_px": [
                            round(col * lv.seg_w * ds),
                            round(row * lv.seg_h * ds),
                            round(min(lv.width, (col + 1) * lv.seg_w) * ds),
                            round(min(lv.height, (row + 1) * lv.seg_h) * ds),
                        ],
                        "error": err.reason,
                    }
                )
            seg = None
        with self._lock:
            if key not in self._cache:  # another reader thread may have decoded it meanwhile
                self._cache[key] = seg
                self._cache_bytes += 0 if seg is None else seg.nbytes
                while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= 0 if old is None else old.nbytes
        return seg

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


#: Adobe APP14 marker with transform 0: tells libjpeg the components are RGB, not YCbCr
#: (Aperio writes RGB JPEG tiles with TIFF photometric RGB and no such marker).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class _TiffLevel:
    """One pyramid level stored as one TIFF page: its tile (or strip) grid and decoder."""

    def __init__(self, page: Any, file_size: int, path: Path) -> None:
        self.page = page
        self.path = path
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"page {page.index} has no pixels ({self.width}x{self.height})")
        if int(page.planarconfig) != 1 and int(page.samplesperpixel) > 1:
            raise ValueError(f"page {page.index} stores colour planes separately (planar configuration 2)")
        if page.is_tiled:
            self.seg_w, self.seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            self.seg_w, self.seg_h = self.width, int(page.rowsperstrip or self.height) or self.height
        self.n_across = math.ceil(self.width / self.seg_w)
        n_down = math.ceil(self.height / min(self.seg_h, self.height))
        expected = self.n_across * n_down
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) != expected or len(counts) != expected:
            raise SlideOpenError(
                f"{path}: page {page.index} declares {self.width}x{self.height} px in {expected} "
                f"{'tiles' if page.is_tiled else 'strips'} but lists {len(offsets)}; the header is corrupt "
                "(re-export or re-copy the slide)"
            )
        ends = [o + c for o, c in zip(offsets, counts) if c]
        if ends and max(ends) > file_size:
            raise SlideOpenError(
                f"{path}: page {page.index} has tile data up to byte {max(ends)} but the file has {file_size} bytes; "
                "the file is truncated (re-copy it)"
            )
        self.samples = int(page.samplesperpixel)
        self.photometric = int(page.photometric)
        self.bits = int(page.bitspersample)
        self.jpeg = int(page.compression) == 7 and self.bits == 8 and self.samples in (1, 3)
        self._decode_tiff = page.decode
        self._jpeg_check = False  # decode JPEG with both decoders when they disagree on this file

    def read(self, index: int, fh: Any) -> tuple[bytes, int] | None:
        """The stored bytes of tile ``index`` and the byte count the header promises; None if sparse."""
        off, count = int(self.page.dataoffsets[index]), int(self.page.databytecounts[index])
        if count == 0 or off == 0:
            return None
        fh.seek(off)
        return fh.read(count), count

    def decode(self, stored: tuple[bytes, int], index: int) -> np.ndarray:
        """Tile ``index``'s bytes (from :meth:`read`) as (h, w, 3) uint8 RGB.

        Raises:
            BadTileError: naming the tile, when its bytes are missing or cannot be decoded.
        """
        raw, count = stored
        row, col = divmod(index, self.n_across)
        try:
            if len(raw) != count:
                raise ValueError(f"{len(raw)} of {count} bytes present")
            if self.jpeg:
                seg = self._decode_jpeg(raw, index)
            else:
                seg = np.asarray(self._decode_tiff(raw, index, jpegtables=self.page.jpegtables)[0])[0]
        except Exception as err:  # each codec raises its own types; all mean the same: bad tile data
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadTileError(
                f"{self.path}: tile (column {col}, row {row}) of level page {self.page.index} cannot be decoded "
                f"({reason}); the slide is damaged: re-scan or re-copy it, or pass --on-bad-tile skip to mask "
                "that area as unknown",
                reason,
            ) from err
        return self._to_rgb(seg)

    def _decode_jpeg(self, raw: bytes, index: int) -> np.ndarray:
        import simplejpeg

        tables = self.page.jpegtables
        body = (bytes(tables[2:-2]) if tables else b"") + raw[2:]
        rgb_coded = self.samples == 3 and self.photometric == 2
        stream = b"\xff\xd8" + (_ADOBE_RGB if rgb_coded else b"") + body
        seg: np.ndarray = simplejpeg.decode_jpeg(stream, colorspace="RGB" if self.samples == 3 else "GRAY", strict=True)
        if self.samples == 1 and seg.ndim == 3:
            seg = seg[..., :1]
        if self._jpeg_check:
            ref = np.asarray(self._decode_tiff(raw, index, jpegtables=tables)[0])[0]
            seg = ref[: seg.shape[0], : seg.shape[1]]
        return seg

    def check_jpeg_colours(self, fh: Any) -> None:
        """Compare strict decoding with tifffile's on the first tile; keep tifffile's colours if they differ."""
        if not self.jpeg:
            return
        nonzero = [i for i, c in enumerate(self.page.databytecounts) if c]
        if not nonzero:
            return
        index, count = nonzero[0], self.page.databytecounts[nonzero[0]]
        fh.seek(int(self.page.dataoffsets[index]))
        raw = fh.read(int(count))
        try:
            ours = self._decode_jpeg(raw, index)
            ref = np.asarray(self._decode_tiff(raw, index, jpegtables=self.page.jpegtables)[0])[0]
        except Exception:
            return  # a bad first tile is reported when it is read
        h, w = min(ours.shape[0], ref.shape[0]), min(ours.shape[1], ref.shape[1])
        if not np.array_equal(ours[:h, :w], ref[:h, :w, : ours.shape[2]]):
            self._jpeg_check = True

    def _to_rgb(self, seg: np.ndarray) -> np.ndarray:
        if seg.ndim == 2:
            seg = seg[..., None]
        if seg.dtype == bool or (seg.dtype.kind in "ui" and 1 <= self.bits < 8):
            seg = (seg.astype(np.uint16) * 255 // max(1, (1 << self.bits) - 1)).astype(np.uint8)
        rgb = _to_rgb8(seg)
        if self.photometric == 0:  # min-is-white
            rgb = 255 - rgb
        return rgb


def _to_rgb8(region: np.ndarray) -> np.ndarray:
    """Grey, grey+alpha, RGB or RGBA of any integer/float dtype to RGB uint8 (transparent is white)."""
    if region.dtype != np.uint8:
        if region.dtype == bool:
            region = region.astype(np.uint8) * 255
        elif np.issubdtype(region.dtype, np.floating):
            region = np.nan_to_num(region, nan=0.0, posinf=0.0, neginf=0.0)
            region = np.clip(region * (255.0 if region.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        else:
            region = (region >> max(0, 8 * region.dtype.itemsize - 8)).astype(np.uint8)
    n = region.shape[-1]
    alpha = region[..., 1] if n == 2 else region[..., 3] if n >= 4 else None
    rgb = np.repeat(region[..., :1], 3, axis=-1) if n <= 2 else region[..., :3]
    if alpha is not None:
        rgb = rgb.copy()
        rgb[alpha == 0] = 255
    return rgb


_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def _positive(value: Any) -> float | None:
    """A positive finite float from metadata text, else None."""
    if value is None or not _NUMBER.match(str(value)):
        return None
    v = float(value)
    return v if 0 < v < math.inf else None


def _mean_mpp(mx: Any, my: Any) -> tuple[float | None, str | None]:
    """Mean of the x/y µm/px metadata values and, when they are unusable, why."""
    given = [v for v in (mx, my) if v not in (None, "")]
    vals = [v for v in (_positive(v) for v in given) if v is not None and v < 1000]
    if vals:
        return float(np.mean(vals)), None
    if given:
        return None, f"resolution metadata {', '.join(repr(str(v)) for v in given)} is not a positive µm/px value"
    return None, None


def tiff_resolution(tif: Any) -> tuple[float | None, float | None, str | None]:
    """(level-0 µm/px, objective power, note on unusable metadata) from Aperio, OME or TIFF resolution tags."""
    page = tif.pages[0]
    desc = page.description or ""
    power = None
    m = re.search(r"AppMag\s*=\s*([^|\r\n]+)", desc)
    if m:
        power = _positive(m.group(1))
    m = re.search(r"\bMPP\s*=\s*([^|\r\n]*)", desc)
    if m:
        mpp, _ = _mean_mpp(m.group(1).strip(), None)
        if mpp is not None:
            return mpp, power, None
        return None, power, f"Aperio MPP = {m.group(1).strip()!r} is not a positive µm/px value"
    if tif.is_ome and tif.ome_metadata:
        mx = re.search(r'PhysicalSizeX="([^"]+)"', tif.ome_metadata)
        my = re.search(r'PhysicalSizeY="([^"]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if mx and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            mpp, note = _mean_mpp(mx.group(1), my.group(1) if my else mx.group(1))
            return mpp, power, note
    xres = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if xres is not None and unit_tag is not None:
        num, den = xres.value
        px_per_unit = num / den if den else 0.0
        unit_code = int(unit_tag.value)
        if px_per_unit > 0 and unit_code == 3:  # centimetre
            return 1e4 / px_per_unit, power, None
        if px_per_unit > 0 and unit_code == 2 and px_per_unit not in (72.0, 96.0):  # inch, not a screen default
            mpp = 25400.0 / px_per_unit
            if mpp < 50:
                return mpp, power, None
    return None, power, None


#: OpenSlide formats that tifffile reads as well and faster (about 10x per decoded megapixel here,
#: ``benchmarks/bench_runner.py``): plain pyramids with no vendor-specific tile layout.
_TIFFFILE_FIRST = {"aperio", "generic-tiff"}


def open_slide(path: str | Path, backend: Backend = "auto", on_bad_tile: BadTilePolicy = "fail") -> Slide:
    """Open a slide with the requested backend.

    ``auto``: files in TIFF containers that OpenSlide detects as Aperio or generic tiled
    TIFF, OME-TIFF, and TIFFs OpenSlide does not recognise (plain or stripped) go to
    tifffile first; vendor formats (Philips, Ventana, Leica, Hamamatsu, MIRAX, ...) to
    OpenSlide. The other backend is the fallback. ``on_bad_tile="skip"`` (tifffile only)
    reads a tile that cannot be decoded as glass and lists it in ``Slide.bad_tiles``;
    the default fails with :class:`BadTileError` naming the tile.

    Raises:
        SlideOpenError: missing file, or no backend reads it.
    """
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(f"{p}: no such file; check the path")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        dcm = dicom_series_file(p)
        if dcm is None:
            raise SlideOpenError(f"{p}: is a folder, not a slide (and holds no DICOM WSI); pass a slide file")
        slide = OpenSlideSlide(dcm)
        slide.path = p  # the series (folder) is the slide
        return slide
    if backend == "openslide":
        return OpenSlideSlide(p)
    if backend == "tifffile":
        return TiffSlide(p, on_bad_tile)
    if backend != "auto":
        raise SlideOpenError(f"{p}: unknown backend {backend!r}; use auto, openslide or tifffile")
    suffix = p.suffix.lower()
    errors: list[str] = []
    if suffix in _OPENSLIDE_ONLY or suffix not in _TIFF_SUFFIXES:
        order = ["openslide"]
    elif p.name.lower().endswith((".ome.tif", ".ome.tiff")) or _detect_openslide_format(p) in _TIFFFILE_FIRST | {None}:
        order = ["tifffile", "openslide"]
    else:
        order = ["openslide", "tifffile"]
    for name in order:
        try:
            return OpenSlideSlide(p) if name == "openslide" else TiffSlide(p, on_bad_tile)
        except SlideOpenError as err:
            errors.append(f"{name}: {getattr(err, 'reason', err)}")
    raise SlideOpenError(
        f"{p}: not a readable slide ({'; '.join(errors)}); "
        "check that the file is complete (re-copy it) and in a format OpenSlide or tifffile reads"
    )


def dicom_series_file(folder: Path) -> Path | None:
    """One ``.dcm`` file of the DICOM WSI series in ``folder`` (OpenSlide finds the rest), or None."""
    try:
        files = sorted(c for c in folder.iterdir() if c.suffix.lower() == ".dcm" and c.is_file())
    except OSError:
        return None
    return next((f for f in files if _detect_openslide_format(f) == "dicom"), None)


def _detect_openslide_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format (``aperio``, ``philips``, ...), or None."""
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None
    return str(fmt) if fmt else None


#: Level-0 µm/px assumed when a slide carries no resolution (20x, the commonest scan).
DEFAULT_ASSUMED_MPP = 0.5


def slide_base_mpp(slide: Slide, slide_mpp: float | None = None, force_slide_mpp: bool = False) -> tuple[float, str]:
    """Level-0 µm/px to use and its source (see :class:`LevelChoice`).

    ``slide_mpp`` is for slides without resolution metadata; given for a slide that has
    its own and differing from it by more than 1 %, it is refused unless ``force_slide_mpp``.

    Raises:
        SlideMppConflictError: ``slide_mpp`` contradicts the slide's metadata.
    """
    if slide_mpp is not None and not (0 < slide_mpp < math.inf):
        raise SlideMppConflictError(f"--slide-mpp {slide_mpp}: must be a positive number of µm per pixel")
    if slide.mpp is not None:
        if slide_mpp is None or abs(slide_mpp - slide.mpp) <= 0.01 * slide.mpp:
            return slide.mpp, "file"
        if not force_slide_mpp:
            raise SlideMppConflictError(
                f"{slide.path}: the slide says {slide.mpp:g} µm/px but --slide-mpp is {slide_mpp:g}; --slide-mpp is "
                "for slides without resolution metadata: drop it, or pass --force-slide-mpp to override the file"
            )
        return slide_mpp, "--slide-mpp"
    if slide_mpp is not None:
        return slide_mpp, "--slide-mpp"
    if slide.objective_power:
        return 10.0 / slide.objective_power, "objective power"
    return DEFAULT_ASSUMED_MPP, "assumed default"


@dataclass(frozen=True)
class LevelChoice:
    """Where to run a model: a pyramid level plus an integer extra downsampling.

    Attributes:
        level: pyramid level read from.
        factor: extra integer downsampling applied on read (1 = none), for slides
            that lack a level close to the requested resolution.
        mpp: effective µm per pixel of the model's input.
        downsample: effective level-0 pixels per model pixel.
        mpp_assumed: True when the slide has no resolution and a default was assumed.
        mpp0: level-0 µm/px used.
        mpp_source: where ``mpp0`` came from: ``file``, ``--slide-mpp`` (the slide has none, or
            ``force_slide_mpp``), ``objective power`` or ``assumed default``.
    """

    level: int
    factor: int
    mpp: float
    downsample: float
    mpp_assumed: bool
    mpp0: float = DEFAULT_ASSUMED_MPP
    mpp_source: str = "file"


def choose_level(
    slide: Slide,
    target_mpp: float | None = None,
    level: int | None = None,
    slide_mpp: float | None = None,
    tolerance: float = 0.25,
    force_slide_mpp: bool = False,
) -> LevelChoice:
    """Pick the pyramid level (and extra integer downsampling) closest to ``target_mpp``.

    The finest level whose µm/px is at most ``target_mpp * (1 + tolerance)`` is taken,
    and an integer factor is added on top when that level is still 2x or more finer
    than the target. ``level`` forces a level. The level-0 resolution comes from
    :func:`slide_base_mpp`; the choice says where from.

    Raises:
        SlideLevelError: ``level`` does not exist, or ``target_mpp`` is not a positive number.
        SlideMppConflictError: see :func:`slide_base_mpp`.
    """
    base_mpp, source = slide_base_mpp(slide, slide_mpp, force_slide_mpp)
    assumed = source in ("objective power", "assumed default")
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise SlideLevelError(
                f"{slide.path}: --level {level} does not exist (this slide has levels 0..{slide.level_count - 1}); "
                "pick one of those or use --mpp"
            )
        ds = slide.level_downsamples[level]
        return LevelChoice(level, 1, base_mpp * ds, ds, assumed, base_mpp, source)
    if target_mpp is None or not (0 < target_mpp < math.inf):
        raise SlideLevelError(f"{slide.path}: µm/px {target_mpp} is not a positive number; pass --mpp > 0")
    candidates = [i for i, ds in enumerate(slide.level_downsamples) if base_mpp * ds <= target_mpp * (1 + tolerance)]
    lvl = max(candidates, key=lambda i: slide.level_downsamples[i]) if candidates else 0
    ds = slide.level_downsamples[lvl]
    factor = max(1, round(target_mpp / (base_mpp * ds)))
    return LevelChoice(lvl, factor, base_mpp * ds * factor, ds * factor, assumed, base_mpp, source)


#: largest level region (bytes of RGB) read at once for one model region; coarser requests go in strips
MAX_REGION_BYTES = 64 << 20


def read_scaled(slide: Slide, choice: LevelChoice, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Read a (h, w, 3) region in *model* pixels at ``choice`` (x, y in model pixels).

    With ``choice.factor > 1`` the level region is area-averaged down by that factor, in strips of
    rows so that at most about ``MAX_REGION_BYTES`` of level pixels are held at once (a 256 px tile at
    64 µm/px on a single-level 0.25 µm/px slide would otherwise be one 65,536² px read).
    """
    f = choice.factor
    if f == 1 or w * f * h * f * 3 <= MAX_REGION_BYTES:
        return box_reduce(level_region(slide, choice, x, y, w, h), f)
    # only the part that overlaps the slide is read (beyond it the slide reads as white anyway), in strips
    mw, mh = model_dimensions(slide, choice)
    w_in, h_in = max(0, min(w, mw - x)), max(0, min(h, mh - y))
    out = np.full((h, w, 3), 255, np.uint8)
    rows = max(1, MAX_REGION_BYTES // (max(1, w_in) * f * f * 3))  # model rows per strip
    for r in range(0, h_in, rows):
        n = min(rows, h_in - r)
        out[r : r + n, :w_in] = box_reduce(level_region(slide, choice, x, y + r, w_in, n), f)
    return out


def region_is_large(choice: LevelChoice, w: int, h: int) -> bool:
    """True when a (w, h) model region at ``choice`` is more level pixels than :func:`read_scaled` reads at once."""
    return choice.factor > 1 and w * choice.factor * h * choice.factor * 3 > MAX_REGION_BYTES


def level_region(slide: Slide, choice: LevelChoice, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The pyramid-level pixels behind a (w, h) region in model pixels at ``choice`` (before down-scaling)."""
    f = choice.factor
    ds_level = slide.level_downsamples[choice.level]
    loc0 = (round(x * f * ds_level), round(y * f * ds_level))
    return slide.read_region(loc0, choice.level, (w * f, h * f))


def box_reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average an (H, W, C) uint8 image by an integer ``factor`` (H, W multiples of it).

    The block mean rounded half up, summed over ``factor``² strided views in integers:
    exact, and much cheaper than a float64 mean over reshaped blocks, which cost the
    runner more than JPEG decoding at 4 and 8 µm/px (issue #5).
    """
    if factor == 1:
        return image
    acc = image[::factor, ::factor].astype(np.uint16 if factor <= 16 else np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                np.add(acc, image[dy::factor, dx::factor], out=acc)
    np.add(acc, (factor * factor) // 2, out=acc)
    np.floor_divide(acc, factor * factor, out=acc)
    return acc.astype(np.uint8)


def model_dimensions(slide: Slide, choice: LevelChoice) -> tuple[int, int]:
    """(width, height) in pixels of the slide at ``choice``."""
    lw, lh = slide.level_dimensions[choice.level]
    return math.ceil(lw / choice.factor), math.ceil(lh / choice.factor)


def thumbnail(slide: Slide, max_side_px: int = 2048, block_px: int = 2048) -> tuple[np.ndarray, float]:
    """A bounded-memory RGB overview whose long side is at most ``max_side_px``.

    Returns (image, downsample) with downsample in level-0 pixels per thumbnail pixel.
    The smallest level that is at least as large as needed is read block by block and
    area-averaged, so a single-level gigapixel slide is never held whole.
    """
    w0, h0 = slide.dimensions
    need_ds = max(w0, h0) / max_side_px
    levels = [i for i, ds in enumerate(slide.level_downsamples) if ds <= max(need_ds, 1.0)]
    lvl = max(levels, key=lambda i: slide.level_downsamples[i]) if levels else 0
    ds_l = slide.level_downsamples[lvl]
    f = max(1, math.ceil(need_ds / ds_l))
    lw, lh = slide.level_dimensions[lvl]
    tw, th = math.ceil(lw / f), math.ceil(lh / f)
    out = np.empty((th, tw, 3), dtype=np.uint8)
    step = max(f, (block_px // f) * f)
    for by in range(0, lh, step):
        for bx in range(0, lw, step):
            bw, bh = min(step, lw - bx), min(step, lh - by)
            cw, ch = math.ceil(bw / f), math.ceil(bh / f)
            region = slide.read_region((int(bx * ds_l), int(by * ds_l)), lvl, (cw * f, ch * f))
            out[by // f : by // f + ch, bx // f : bx // f + cw] = box_reduce(region, f)
    return out, ds_l * f

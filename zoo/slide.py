"""Slide I/O: one reader interface over OpenSlide and tifffile.

Coordinates are (x, y) in level-0 pixels unless a name says otherwise; sizes are
(width, height). Regions are read lazily (OpenSlide tiles, or tifffile through
zarr chunks), never a whole level-0 image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zoo.errors import SlideOpenError

Backend = Literal["auto", "openslide", "tifffile"]
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
        self.mpp = _mean_mpp(mx, my)
        op = props.get("openslide.objective-power")
        self.objective_power = float(op) if op else None

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        try:
            rgba = np.asarray(self._osr.read_region(location_px, level, size_px))
        except Exception as err:  # openslide raises its own error type on a bad tile
            raise SlideOpenError(f"{self.path}: cannot read region {location_px} at level {level} ({err})") from err
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255  # transparent (outside the scanned area) is glass
        return rgb

    def close(self) -> None:
        self._osr.close()


class TiffSlide(Slide):
    """Generic, OME and Aperio pyramidal TIFF, and plain (stripped, single-level) TIFF, via tifffile+zarr."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.path = path
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series
            if not series:
                raise ValueError("no image series")
            base = series[0]
            # tifffile groups SVS/OME/SubIFD pyramids and generic page pyramids into series[0].levels;
            # other series are associated images (thumbnail, label, macro), never levels.
            level_series = [(0, lvl) for lvl in range(len(base.levels))]
            self._axes = base.axes
            self._arrays: list[Any] = []
            dims = []
            for s_idx, lvl in level_series:
                arr: Any = zarr.open(self._tif.series[s_idx].aszarr(level=lvl), mode="r")
                self._arrays.append(arr)
                dims.append(self._wh(arr.shape, self._axes))
        except (tifffile.TiffFileError, ValueError, OSError, KeyError) as err:
            e = SlideOpenError(
                f"{path}: tifffile cannot read this file ({err}); check that it is a complete TIFF/SVS slide"
            )
            e.reason = str(err)
            raise e from err
        if self._axes not in ("YXS", "YX", "CYX", "SYX"):
            raise SlideOpenError(f"{path}: unsupported TIFF axes {self._axes!r}; expected an RGB or grey 2-D image")
        # Keep levels in decreasing size order (some writers store thumbnails between levels).
        order = sorted(range(len(dims)), key=lambda i: -dims[i][0])
        self._arrays = [self._arrays[i] for i in order if dims[i][0] <= dims[order[0]][0]]
        self.level_dimensions = tuple(dims[i] for i in order)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        self.mpp, self.objective_power = tiff_resolution(self._tif)

    @staticmethod
    def _wh(shape: tuple[int, ...], axes: str) -> tuple[int, int]:
        return int(shape[axes.index("X")]), int(shape[axes.index("Y")])

    def read_region(self, location_px: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x = round(location_px[0] / ds)
        y = round(location_px[1] / ds)
        w, h = size_px
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        arr: Any = self._arrays[level]
        try:
            if self._axes in ("YXS",):
                region = np.asarray(arr[y0:y1, x0:x1])
            elif self._axes in ("CYX", "SYX"):
                region = np.moveaxis(np.asarray(arr[:, y0:y1, x0:x1]), 0, -1)
            else:
                region = np.asarray(arr[y0:y1, x0:x1])[..., None]
        except Exception as err:  # codec errors surface from zarr as various types
            raise SlideOpenError(f"{self.path}: cannot decode region at level {level} ({err})") from err
        region = _to_rgb8(region)
        return _white_pad(region, x0 - x, y0 - y, w, h)

    def close(self) -> None:
        self._tif.close()


def _to_rgb8(region: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA of any integer/float dtype to RGB uint8."""
    if region.dtype != np.uint8:
        if np.issubdtype(region.dtype, np.floating):
            region = np.clip(region * (255.0 if region.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        else:
            region = (region >> max(0, 8 * region.dtype.itemsize - 8)).astype(np.uint8)
    if region.shape[-1] == 1:
        region = np.repeat(region, 3, axis=-1)
    return region[..., :3]


def _mean_mpp(mx: Any, my: Any) -> float | None:
    vals = [float(v) for v in (mx, my) if v not in (None, "", "0")]
    vals = [v for v in vals if 0 < v < 1000]
    return float(np.mean(vals)) if vals else None


def tiff_resolution(tif: Any) -> tuple[float | None, float | None]:
    """(level-0 µm/px, objective power) from Aperio, OME or TIFF resolution tags."""
    page = tif.pages[0]
    desc = page.description or ""
    power = None
    m = re.search(r"AppMag\s*=\s*([\d.]+)", desc)
    if m:
        power = float(m.group(1))
    m = re.search(r"MPP\s*=\s*([\d.]+)", desc)
    if m:
        return float(m.group(1)), power
    if tif.is_ome and tif.ome_metadata:
        mx = re.search(r'PhysicalSizeX="([\d.eE+-]+)"', tif.ome_metadata)
        my = re.search(r'PhysicalSizeY="([\d.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if mx and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            return _mean_mpp(mx.group(1), my.group(1) if my else mx.group(1)), power
    xres = page.tags.get("XResolution")
    unit_tag = page.tags.get("ResolutionUnit")
    if xres is not None and unit_tag is not None:
        num, den = xres.value
        px_per_unit = num / den if den else 0.0
        unit_code = int(unit_tag.value)
        if px_per_unit > 0 and unit_code == 3:  # centimetre
            return 1e4 / px_per_unit, power
        if px_per_unit > 0 and unit_code == 2 and px_per_unit not in (72.0, 96.0):  # inch, not a screen default
            mpp = 25400.0 / px_per_unit
            if mpp < 50:
                return mpp, power
    return None, power


#: OpenSlide formats that tifffile reads as well and faster (about 10x per decoded megapixel here,
#: ``benchmarks/bench_runner.py``): plain pyramids with no vendor-specific tile layout.
_TIFFFILE_FIRST = {"aperio", "generic-tiff"}


def open_slide(path: str | Path, backend: Backend = "auto") -> Slide:
    """Open a slide with the requested backend.

    ``auto``: files in TIFF containers that OpenSlide detects as Aperio or generic tiled
    TIFF, OME-TIFF, and TIFFs OpenSlide does not recognise (plain or stripped) go to
    tifffile first; vendor formats (Philips, Ventana, Leica, Hamamatsu, MIRAX, ...) to
    OpenSlide. The other backend is the fallback.

    Raises:
        SlideOpenError: missing file, or no backend reads it.
    """
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(f"{p}: no such file; check the path")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        raise SlideOpenError(f"{p}: is a directory, not a slide; pass a slide file")
    if backend == "openslide":
        return OpenSlideSlide(p)
    if backend == "tifffile":
        return TiffSlide(p)
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
            return OpenSlideSlide(p) if name == "openslide" else TiffSlide(p)
        except SlideOpenError as err:
            errors.append(f"{name}: {getattr(err, 'reason', err)}")
    raise SlideOpenError(
        f"{p}: not a readable slide ({'; '.join(errors)}); "
        "check that the file is complete (re-copy it) and in a format OpenSlide or tifffile reads"
    )


def _detect_openslide_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format (``aperio``, ``philips``, ...), or None."""
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        return None
    return str(fmt) if fmt else None


@dataclass(frozen=True)
class LevelChoice:
    """Where to run a model: a pyramid level plus an integer extra downsampling.

    Attributes:
        level: pyramid level read from.
        factor: extra integer downsampling applied on read (1 = none), for slides
            that lack a level close to the requested resolution.
        mpp: effective µm per pixel of the model's input.
        downsample: effective level-0 pixels per model pixel.
        mpp_assumed: True when the slide has no resolution and ``slide_mpp`` was assumed.
    """

    level: int
    factor: int
    mpp: float
    downsample: float
    mpp_assumed: bool


#: Level-0 µm/px assumed when a slide carries no resolution (20x, the commonest scan).
DEFAULT_ASSUMED_MPP = 0.5


def choose_level(
    slide: Slide,
    target_mpp: float | None = None,
    level: int | None = None,
    slide_mpp: float | None = None,
    tolerance: float = 0.25,
) -> LevelChoice:
    """Pick the pyramid level (and extra integer downsampling) closest to ``target_mpp``.

    The finest level whose µm/px is at most ``target_mpp * (1 + tolerance)`` is taken,
    and an integer factor is added on top when that level is still 2x or more finer
    than the target. ``level`` forces a level. Without resolution metadata the slide
    is assumed to be ``slide_mpp`` (or 0.5 µm/px, i.e. 20x) at level 0; the choice says so.
    """
    base_mpp = slide_mpp or slide.mpp
    assumed = base_mpp is None
    if base_mpp is None:
        base_mpp = (10.0 / slide.objective_power) if slide.objective_power else DEFAULT_ASSUMED_MPP
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ValueError(f"level {level} does not exist in {slide.path} (levels 0..{slide.level_count - 1})")
        ds = slide.level_downsamples[level]
        return LevelChoice(level, 1, base_mpp * ds, ds, assumed)
    if target_mpp is None:
        raise ValueError("give target_mpp or level")
    candidates = [i for i, ds in enumerate(slide.level_downsamples) if base_mpp * ds <= target_mpp * (1 + tolerance)]
    lvl = max(candidates, key=lambda i: slide.level_downsamples[i]) if candidates else 0
    ds = slide.level_downsamples[lvl]
    factor = max(1, round(target_mpp / (base_mpp * ds)))
    return LevelChoice(lvl, factor, base_mpp * ds * factor, ds * factor, assumed)


def read_scaled(slide: Slide, choice: LevelChoice, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Read a (h, w, 3) region in *model* pixels at ``choice`` (x, y in model pixels).

    With ``choice.factor > 1`` the level region is area-averaged down by that factor.
    """
    f = choice.factor
    ds_level = slide.level_downsamples[choice.level]
    loc0 = (round(x * f * ds_level), round(y * f * ds_level))
    region = slide.read_region(loc0, choice.level, (w * f, h * f))
    return box_reduce(region, f)


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

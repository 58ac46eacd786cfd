"""Slide I/O over both backends, on real slides, plus the broken and missing ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoo.errors import SlideOpenError, ZooError
from zoo.slide import box_reduce, choose_level, model_dimensions, open_slide, read_scaled, thumbnail


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_cmu_svs_both_backends(cmu_slide: Path, backend: str) -> None:
    with open_slide(cmu_slide, backend=backend) as s:  # type: ignore[arg-type]
        assert s.backend == backend
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1  # thumbnail, label and macro are not levels
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power == 20
        region = s.read_region((1000, 1200), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        assert 60 < region.mean() < 240  # tissue, not blank


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_tcga_jpeg2000_levels_and_no_mpp(tcga_slide: Path, backend: str) -> None:
    with open_slide(tcga_slide, backend=backend) as s:  # type: ignore[arg-type]
        assert s.level_count == 2
        assert s.level_dimensions[1] == (2221, 1783)
        assert s.mpp is None
        lvl1 = s.read_region((2000, 1500), 1, (128, 128))
        assert lvl1.std() > 5


def test_backends_agree_pixel_for_pixel(tcga_slide: Path) -> None:
    with open_slide(tcga_slide, "openslide") as a, open_slide(tcga_slide, "tifffile") as b:
        ra, rb = a.read_region((1234, 777), 0, (256, 192)), b.read_region((1234, 777), 0, (256, 192))
        assert np.array_equal(ra, rb)  # same JPEG 2000 decode at level 0
        # OpenSlide paints levels with non-integer downsample (here 2.0005) at sub-pixel offsets
        ra, rb = a.read_region((2000, 1000), 1, (256, 192)), b.read_region((2000, 1000), 1, (256, 192))
        assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 8


def test_auto_prefers_tifffile_for_aperio_and_generic(cmu_slide: Path, tcga_slide: Path, tmp_path: Path) -> None:
    from zoo.outputs import write_mask_tiff

    for p in (cmu_slide, tcga_slide):
        with open_slide(p) as s:
            assert s.backend == "tifffile"
    mask = tmp_path / "m.tiff"
    write_mask_tiff(mask, np.zeros((1200, 700), np.uint8), mpp=2.0)
    with open_slide(mask) as s:
        assert s.backend == "tifffile" and s.level_count == 2 and s.mpp == pytest.approx(2.0)


def test_plain_tiff_goes_to_tifffile(kidney_slide: Path) -> None:
    with open_slide(kidney_slide) as s:
        assert s.backend == "tifffile"
        assert s.dimensions == (1493, 901)
    with pytest.raises(SlideOpenError):
        open_slide(kidney_slide, backend="openslide")


def test_outside_the_slide_is_white(cmu_slide: Path) -> None:
    for backend in ("openslide", "tifffile"):
        with open_slide(cmu_slide, backend=backend) as s:  # type: ignore[arg-type]
            r = s.read_region((2100, 2900), 0, (300, 300))
            assert (r[200:, 200:] == 255).all()


def test_broken_slide_is_one_clear_error(broken_slide: Path) -> None:
    with pytest.raises(SlideOpenError) as exc:
        open_slide(broken_slide)
    err = exc.value
    assert isinstance(err, OSError) and isinstance(err, ZooError)
    msg = str(err)
    assert str(broken_slide) in msg and "check" in msg and "\n" not in msg


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideOpenError, match="directory"):
        open_slide(tmp_path)


def test_choose_level_by_resolution(tcga_slide: Path, cmu_slide: Path) -> None:
    with open_slide(tcga_slide) as s:
        c = choose_level(s, target_mpp=1.0)  # no mpp: assumed 0.5 at level 0
        assert c.mpp_assumed and c.level == 1 and c.factor == 1 and c.mpp == pytest.approx(1.0, rel=0.01)
        c = choose_level(s, target_mpp=4.0, slide_mpp=0.25)
        assert c.level == 1 and c.factor == 8
        assert choose_level(s, level=0).downsample == 1.0
        with pytest.raises(ValueError, match="level 5 does not exist"):
            choose_level(s, level=5)
    with open_slide(cmu_slide) as s:
        c = choose_level(s, target_mpp=4.0)
        assert not c.mpp_assumed and c.level == 0 and c.factor == 8
        w, h = model_dimensions(s, c)
        assert (w, h) == (278, 371)
        tile = read_scaled(s, c, 100, 100, 64, 64)
        assert tile.shape == (64, 64, 3)
        region = s.read_region((800, 800), 0, (512, 512))
        assert np.array_equal(tile, box_reduce(region, 8))


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_box_reduce_is_the_rounded_block_mean(factor: int) -> None:
    img = np.random.default_rng(factor).integers(0, 256, (12 * factor, 8 * factor, 3), dtype=np.uint8)
    sums = img.reshape(12, factor, 8, factor, 3).sum(axis=(1, 3), dtype=np.int64)
    expected = (sums * 2 + factor * factor) // (2 * factor * factor)  # mean, rounded half up
    got = box_reduce(img, factor)
    assert got.dtype == np.uint8 and got.shape == (12, 8, 3)
    assert np.array_equal(got, expected)


def test_thumbnail_is_bounded(tcga_slide: Path) -> None:
    with open_slide(tcga_slide) as s:
        t, ds = thumbnail(s, max_side_px=500, block_px=300)
        assert max(t.shape[:2]) <= 500
        assert ds == pytest.approx(s.dimensions[0] / t.shape[1], rel=0.02)

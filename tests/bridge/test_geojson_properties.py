"""Every geometry the project writes is valid by construction (issue #13): property-based tests.

QuPath 0.6 and later refuse a whole GeoJSON file when one polygon self-intersects, so
vectorisation must give OGC-valid polygons whose rings are simple, for any mask, and
rasterising them back must give the mask (exactly without simplification; with it, only
pixels within the tolerance of a boundary may change).
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio import features as rfeatures
from scipy import ndimage as ndi
from shapely.geometry import mapping

from bridge.geojson import ClassStyle, mask_to_feature_collection, mask_to_polygons


def _rasterise(polys: dict[int, list[shapely.Polygon]], shape: tuple[int, int], ds: float) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for val, ps in polys.items():
        if ps:
            r = rfeatures.rasterize(
                [(mapping(p), val) for p in ps], out_shape=shape, transform=Affine.scale(ds), fill=0, dtype="uint8"
            )
            out = np.where(r > 0, r, out)
    return out


def _assert_valid(polys: dict[int, list[shapely.Polygon]]) -> None:
    for ps in polys.values():
        for p in ps:
            assert isinstance(p, shapely.Polygon) and p.is_valid, shapely.is_valid_reason(p)
            for ring in (p.exterior, *p.interiors):
                assert ring.is_simple, f"self-touching ring {ring.wkt[:80]}"


def _structured(kind: str, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.uint8)
    if kind == "checkerboard":
        m = (np.indices((n, n)).sum(0) % 2).astype(np.uint8)
    elif kind == "single":
        m[n // 2, n // 2] = 1
    elif kind == "diagonal":
        np.fill_diagonal(m, 1)
        np.fill_diagonal(m[:, 1:], 2)
    elif kind == "hole-at-border":  # a ring whose hole opens onto the mask edge
        m[:, :] = 1
        m[2:-2, 2:-2] = 0
        m[n // 2, :2] = 0
    elif kind == "island-in-hole":
        m[:, :] = 1
        m[2:-2, 2:-2] = 0
        m[n // 2 - 1 : n // 2 + 1, n // 2 - 1 : n // 2 + 1] = 1
    elif kind == "pinched":  # a ring closed only by a diagonal contact: a self-touching trace
        m[1:6, 1:6] = 1
        m[2:5, 2:5] = 0
        m[1, 1] = 0
        m[0, 0] = 1
    elif kind == "lines":
        m[::3, :] = 1
        m[:, ::4] = 2
    return m


masks = st.one_of(
    st.builds(
        lambda h, w, p, seed, k: (
            (np.random.default_rng(seed).random((h, w)) < p).astype(np.uint8)
            * np.random.default_rng(seed + 1).integers(1, k + 1, (h, w)).astype(np.uint8)
        ),
        st.integers(1, 24),
        st.integers(1, 24),
        st.floats(0.05, 0.95),
        st.integers(0, 2**31),
        st.integers(1, 3),
    ),
    st.builds(
        _structured,
        st.sampled_from(["checkerboard", "single", "diagonal", "hole-at-border", "island-in-hole", "pinched", "lines"]),
        st.integers(7, 20),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks, ds=st.sampled_from([1.0, 2.0, 3.5, 16.0]), band_rows=st.integers(1, 30))
def test_exact_vectorisation_is_valid_and_lossless(mask: np.ndarray, ds: float, band_rows: int) -> None:
    polys = mask_to_polygons(mask, ds, band_bytes=band_rows * mask.shape[1])
    _assert_valid(polys)
    assert np.array_equal(_rasterise(polys, mask.shape, ds), mask)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks, ds=st.sampled_from([1.0, 4.0]), tol_px=st.sampled_from([0.5, 1.0, 2.0]))
def test_simplified_vectorisation_is_valid_within_tolerance(mask: np.ndarray, ds: float, tol_px: float) -> None:
    polys = mask_to_polygons(mask, ds, simplify_px=tol_px * ds)
    _assert_valid(polys)
    back = _rasterise(polys, mask.shape, ds)
    edges = np.zeros(mask.shape, bool)
    for val in np.unique(mask):
        m = mask == val
        edges |= m ^ ndi.binary_erosion(m, border_value=0)  # the mask's edge is a boundary too
    near = ndi.binary_dilation(edges, iterations=int(np.ceil(tol_px)) + 1)
    assert not ((back != mask) & ~near).any(), "a pixel farther than the tolerance from any boundary changed"


def test_checkerboard_512_is_fast_and_every_square_kept() -> None:
    """The 512x512 checkerboard took over 11 minutes; it is 131,072 separate one-pixel squares."""
    mask = (np.indices((512, 512)).sum(0) % 2).astype(np.uint8) + 1
    fc = mask_to_feature_collection(mask, [ClassStyle(1, "A", (255, 0, 0)), ClassStyle(2, "B", (0, 0, 255))], 1.0)
    assert len(fc["features"]) == 512 * 512


def test_min_area_before_tracing_matches_after(tmp_path: object) -> None:
    rng = np.random.default_rng(3)
    mask = (rng.random((300, 200)) < 0.45).astype(np.uint8)
    mask[50:150, 50:150] = 1
    for band_rows in (7, 300):
        got = mask_to_polygons(mask, 2.0, min_area_px=40.0, band_bytes=band_rows * 200)
        ref = {v: [p for p in ps if p.area > 40.0] for v, ps in mask_to_polygons(mask, 2.0).items()}
        assert sorted(p.area for p in got[1]) == sorted(p.area for p in ref[1])


@pytest.mark.parametrize("value", [1, 2])
def test_value_selects_one_label(value: int) -> None:
    mask = np.array([[1, 1, 0, 2], [1, 0, 2, 2]], np.uint8)
    polys = mask_to_polygons(mask, value=value)
    assert set(polys) == {value}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mask=masks,
    ds=st.sampled_from([1.0, 3.0047, 16.0123, 63.9]),
    tol_px=st.sampled_from([0.7, 2.0, 4.1]),
)
def test_written_multiclass_geojson_is_valid_after_simplification(mask: np.ndarray, ds: float, tol_px: float) -> None:
    """What is *written* (simplified, several classes, coordinates rounded to 0.01 px, odd downsamples) is valid:
    QuPath 0.5 keeps an invalid polygon invalid and 0.6+ silently changes it (issue 22, item 6)."""
    from shapely.geometry import shape

    classes = [ClassStyle(1, "A", (255, 0, 0)), ClassStyle(2, "B", (0, 0, 255)), ClassStyle(3, "Ignore*", (180,) * 3)]
    fc = mask_to_feature_collection(mask, classes, ds, mpp0=0.5, simplify_um=tol_px * ds * 0.5)
    for f in fc["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0, shapely.is_valid_reason(g)
        for ring in (g.exterior, *g.interiors):
            assert ring.is_simple

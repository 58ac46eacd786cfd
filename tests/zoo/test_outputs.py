"""Mask TIFFs are pyramidal, carry resolution, open in OpenSlide, and are never left partial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from zoo.errors import OutputError
from zoo.outputs import atomic_path, read_mask_tiff, write_mask_tiff


def test_pyramid_tiff_roundtrip_and_openslide(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((2100, 1100)) > 0.5).astype(np.uint8)
    out = tmp_path / "m.tiff"
    n = write_mask_tiff(
        out, mask, mpp=2.0, colormap={0: (255, 255, 255), 1: (0, 160, 0)}, description='{"downsample": 4}'
    )
    assert n == 3
    back, mpp, meta = read_mask_tiff(out)
    assert np.array_equal(back, mask) and mpp == pytest.approx(2.0) and meta == {"downsample": 4}
    s = openslide.OpenSlide(str(out))
    assert s.level_count == 3 and s.dimensions == (1100, 2100)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(2.0)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "x.json"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="choose a writable"):
        write_mask_tiff(blocker / "sub" / "m.tiff", np.zeros((4, 4), np.uint8), None)

"""A label mask that never has to be held whole: written in row bands, read back in bands.

Small masks live in memory; large ones in an unlinked scratch file written with
``pwrite`` and read with ``pread`` (page cache, not process memory: a memory map's
dirty pages would count against the process and grow with the slide). Class pixel
counts are kept as rows are written, so no pass over the whole mask is needed for
areas and fractions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: Masks up to this many pixels stay in memory.
IN_MEMORY_LIMIT_PX = 64 << 20

#: Label of pixels whose slide data could not be decoded (``--on-bad-tile skip``).
UNKNOWN_LABEL = 255


class RowSource(Protocol):
    """Anything a label raster can be read from in row bands."""

    shape: tuple[int, int]

    def read_rows(self, y0: int, y1: int, step: int = 1) -> np.ndarray: ...


class ArrayRows:
    """:class:`RowSource` view of an in-memory (height, width) array."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 2:
            raise ValueError(f"a label mask is 2-D, got shape {array.shape}")
        self.array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))

    def read_rows(self, y0: int, y1: int, step: int = 1) -> np.ndarray:
        return np.asarray(self.array[y0:y1:step])


def as_rows(mask: np.ndarray | RowSource) -> RowSource:
    """A :class:`RowSource` for an array or a :class:`LabelMask`."""
    return mask if hasattr(mask, "read_rows") else ArrayRows(np.asarray(mask))


class LabelMask:
    """(height, width) uint8 class indices, written once per row, top to bottom or in any order.

    Attributes:
        shape: (height, width) in mask pixels.
        on_disk: True when the pixels are in a scratch file.
    """

    dtype = np.dtype(np.uint8)

    def __init__(
        self,
        height: int,
        width: int,
        scratch_dir: Path | None = None,
        in_memory_limit_px: int | None = None,
        counted: bool = True,
    ):
        """``counted=False``: keep no class pixel counts (probability rasters, where nobody asks for them)."""
        self.shape = (int(height), int(width))
        self.counted = counted
        limit = IN_MEMORY_LIMIT_PX if in_memory_limit_px is None else in_memory_limit_px
        self._counts = np.zeros(256, np.int64)
        self._written = np.zeros(self.shape[0], bool)
        self._array: np.ndarray | None = None
        self._fd: int | None = None
        if height * width <= limit:
            self._array = np.zeros(self.shape, np.uint8)
        else:
            fd, name = tempfile.mkstemp(suffix=".labels", dir=scratch_dir)
            os.unlink(name)  # the descriptor keeps the data; nothing is left behind, even after kill -9
            os.ftruncate(fd, height * width)  # sparse: unwritten rows read as 0 (background)
            self._fd = fd

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def write_rows(self, y: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, width) uint8 starting at row ``y``; counts follow any rewrite."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        n = rows.shape[0]
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or not 0 <= y <= self.shape[0] - n:
            raise ValueError(f"rows of shape {rows.shape} at y={y} do not fit a mask of shape {self.shape}")
        if self.counted and self._written[y : y + n].any():
            self._counts -= np.bincount(self.read_rows(y, y + n)[self._written[y : y + n]].ravel(), minlength=256)
        if self.counted:
            self._counts += np.bincount(rows.ravel(), minlength=256)
        self._written[y : y + n] = True
        if self._array is not None:
            self._array[y : y + n] = rows
        else:
            assert self._fd is not None
            _pwrite_all(self._fd, rows, y * self.shape[1])

    def read_rows(self, y0: int, y1: int, step: int = 1) -> np.ndarray:
        """Rows ``y0:y1:step`` as a new (n, width) array."""
        y0, y1 = max(0, y0), min(self.shape[0], y1)
        if self._array is not None:
            return self._array[y0:y1:step].copy()
        assert self._fd is not None
        w = self.shape[1]
        if y1 <= y0:
            return np.zeros((0, w), np.uint8)
        if step == 1:
            return _pread_rows(self._fd, y0 * w, (y1 - y0, w))
        return np.stack([_pread_rows(self._fd, y * w, (1, w))[0] for y in range(y0, y1, step)])

    def class_counts(self) -> np.ndarray:
        """Pixels per label value (256 entries); rows never written count as background."""
        if not self.counted:
            raise ValueError("this mask keeps no counts (made with counted=False)")
        counts = self._counts.copy()
        counts[0] += int((~self._written).sum()) * self.shape[1]
        return counts

    def to_array(self) -> np.ndarray:
        """The whole mask in memory (for small masks and tests)."""
        return self.read_rows(0, self.shape[0])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.to_array()
        return arr if dtype is None else arr.astype(dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._array = np.zeros((0, self.shape[1]), np.uint8)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _pwrite_all(fd: int, rows: np.ndarray, offset: int) -> None:
    view = memoryview(rows.data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread_rows(fd: int, offset: int, shape: tuple[int, int]) -> np.ndarray:
    out = np.empty(shape, np.uint8)
    view = memoryview(out.data).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"scratch label file ended at byte {offset + done}")
        done += n
    return out

"""Write a pyramidal slide of real colorectal biopsy tissue for colon-neoplasia's benchmarks.

    python benchmarks/make_colon_slide.py OUT.tiff [--side 18]

colon-neoplasia does its work on colorectal mucosa, which the shared slides do not hold. This slide is a
``side`` x ``side`` mosaic of EBHI-Seg's ``report`` images (real colorectal biopsies of cases never trained
on, 224 px each, in order) at the card's 1.0 um/px, written as an Aperio-layout JPEG pyramid with ``MPP``
(:func:`make_big_slide.make_big_slide`) so that OpenSlide, tifffile and FAST read its resolution.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from evaluate_colon import mosaics  # noqa: E402
from make_big_slide import make_big_slide  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def make_colon_slide(out: Path, side: int = 18) -> Path:
    """``out`` (made once; an existing file is kept): ``side`` x ``side`` report images, 1.0 um/px."""
    import tifffile

    from zoo.train import colon

    if out.exists():
        return out
    data = colon.read_ebhi(SHARED / "ebhi-seg" / "ebhi-seg.zip")
    report = colon.case_splits(data, 0)["report"]
    if len(report) < side * side:
        n = len(report)
        raise ValueError(f"--side {side}: the report half holds {n} images; use --side {int(n**0.5)} or less")
    ((rgb, _),) = mosaics(data.subset(report[: side * side]), side)
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.tiff"
        tifffile.imwrite(flat, rgb, photometric="rgb", tile=(256, 256))
        make_big_slide(flat, out, n=1, mpp=colon.EBHI_MPP)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="pyramidal TIFF to write")
    ap.add_argument("--side", type=int, default=18, help="report images per side (224 px each)")
    a = ap.parse_args()
    print(make_colon_slide(a.out, a.side))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

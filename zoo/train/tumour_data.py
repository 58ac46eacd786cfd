"""Build the training pack for the tumour models (seeded subsets of the PCam train split, plus real glass).

The GPU machine takes at most 64 MiB per call and has no ``shared/``, so the pack holds original
JPEG bytes of a balanced subset: ``stage1`` (classifiers) and a disjoint ``stage2`` (composites for
the refinement U-Net, never seen by stage 1), and ``glass``: 96 px glass patches cut from the blank
band of the real kidney slide (``shared/data/slides/kidney-48-5.tif``), JPEG-encoded at quality 95.

``python -m zoo.train.tumour_data --out train-data/tumour-pack.npz``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from zoo.train.pcam import PATCH_PX, JpegSet, balanced_split, read_pcam, save_pack


def glass_patches(slide: Path, n: int, seed: int) -> np.ndarray:
    """``n`` 96 px glass patches from the tissue-free band of a real slide (see zoo.train.data.glass_from_slide)."""
    from zoo.train.data import glass_from_slide

    band = glass_from_slide(slide)
    rng = np.random.default_rng(seed)
    h, w = band.shape[:2]
    ys = rng.integers(0, h - PATCH_PX + 1, n)
    xs = rng.integers(0, w - PATCH_PX + 1, n)
    return np.stack([band[y : y + PATCH_PX, x : x + PATCH_PX] for y, x in zip(ys, xs, strict=True)])


def glass_set(slide: Path, n: int, seed: int) -> JpegSet:
    """:func:`glass_patches` as JPEG (quality 95, 4:4:4) for a pack, label 0."""
    import simplejpeg

    g = glass_patches(slide, n, seed)
    return JpegSet(
        [simplejpeg.encode_jpeg(p, quality=95, colorsubsampling="444") for p in g],
        np.zeros(len(g), np.int64),
        [f"{slide.name}#glass{i}" for i in range(len(g))],
    )


def build(zip_path: Path, slide: Path, out: Path, n1: int, n2: int, n_glass: int, seed: int) -> dict[str, int]:
    train = read_pcam(zip_path, "train")
    i1 = balanced_split(train.labels, n1, seed)
    i2 = balanced_split(train.labels, n2, seed + 1, exclude=i1)
    glass = glass_set(slide, n_glass, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pack(out, {"stage1": train.subset(i1), "stage2": train.subset(i2), "glass": glass})
    return {"stage1": len(i1), "stage2": len(i2), "glass": len(glass), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.tumour_data", description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    ap.add_argument("--slide", type=Path, default=Path("../shared/data/slides/kidney-48-5.tif"), help="glass source")
    ap.add_argument("--out", type=Path, default=Path("train-data/tumour-pack.npz"), help="pack to write")
    ap.add_argument("--stage1-per-class", type=int, default=4200, help="classifier patches per class")
    ap.add_argument("--stage2-per-class", type=int, default=500, help="composite patches per class")
    ap.add_argument("--glass", type=int, default=200, help="glass patches")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    a = ap.parse_args(argv)
    print(json.dumps(build(a.zip, a.slide, a.out, a.stage1_per_class, a.stage2_per_class, a.glass, a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

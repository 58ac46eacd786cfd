"""Write a pyramidal slide of real lymph-node tissue (tumour and normal regions) for the tumour-model benchmarks.

    python benchmarks/make_lymph_node_slide.py OUT.tiff [--px 4096] [--seed 11]

The tumour models need a slide where they do real work: the shared slides hold no lymph node (skin, kidney
IHC, a frozen section). This one is a seamless composite (:mod:`zoo.train.seamless`) woven from the PCam
valid ``report`` patches (real Camelyon16 lymph-node H&E, never trained on) on real glass, at PCam's
0.972 um/px as level 0, written as an Aperio-layout JPEG pyramid with ``AppMag = 10`` and ``MPP`` so that
OpenSlide, tifffile and FAST all read its resolution (:func:`make_big_slide.make_big_slide`). The tumour
fraction of its tissue is printed and stored beside it (``OUT.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_big_slide import make_big_slide  # noqa: E402

from zoo.train.pcam import PCAM_MPP  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def make_lymph_node_slide(out: Path, px: int = 4096, seed: int = 11) -> Path:
    """``out`` (made once; an existing file is kept) and ``out.json`` with its tissue and tumour fractions."""
    import tifffile
    import torch

    from zoo.train import seamless
    from zoo.train.pcam_recipe import pcam_splits
    from zoo.train.tumour_data import glass_patches

    if out.exists():
        return out
    rep = pcam_splits(SHARED / "pcam" / "pcam-ai4all-trainval.zip", 0).report
    x = torch.from_numpy(np.ascontiguousarray(rep.decode().transpose(0, 3, 1, 2)))
    y = torch.from_numpy(rep.labels)
    glass = glass_patches(SHARED / "slides" / "kidney-48-5.tif", 300, seed)
    g = torch.from_numpy(np.ascontiguousarray(glass.transpose(0, 3, 1, 2)))
    tum, nor = x[y == 1], x[y == 0]
    feats = (seamless.colour_features(tum), seamless.colour_features(nor))
    c = seamless.composite(tum, nor, g, px, torch.Generator().manual_seed(seed), p_tumour_free=0.0,
                           tumour_fraction=(0.3, 0.4), tissue_fraction=(0.6, 0.7), features=feats)  # fmt: skip
    rgb = (c.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.tiff"
        tifffile.imwrite(flat, rgb, photometric="rgb", tile=(256, 256))
        make_big_slide(flat, out, n=1, mpp=PCAM_MPP)
    lab = c.label.numpy()
    tissue = np.isin(lab, (seamless.TISSUE, seamless.TUMOUR))
    info = {"px": px, "mpp": PCAM_MPP, "seed": seed, "tissue_fraction": round(float(tissue.mean()), 4),
            "tumour_fraction_of_tissue": round(float((lab == seamless.TUMOUR).sum() / max(1, tissue.sum())), 4),
            "source": "PCam valid report half woven into a seamless composite on kidney-48-5 glass"}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="pyramidal TIFF to write")
    ap.add_argument("--px", type=int, default=4096, help="side of level 0 in px (0.972 um/px)")
    ap.add_argument("--seed", type=int, default=11, help="random seed")
    a = ap.parse_args()
    print(make_lymph_node_slide(a.out, a.px, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

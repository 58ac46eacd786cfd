"""Pack for the multi-class models: a seeded balanced PCam train subset, real glass, the artefact crops.

``python -m zoo.train.multiclass_data --out train-data/multiclass-pack.npz`` (about 12 MB, so that it
travels to the GPU machine beside the working tree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo.train.multiclass import artefact_arrays
from zoo.train.pcam import balanced_split, read_pcam, save_pack
from zoo.train.tumour_data import glass_set


def build(zip_path: Path, slide: Path, images: Path, out: Path, n: int, n_glass: int, seed: int) -> dict[str, int]:
    train = read_pcam(zip_path, "train")
    idx = balanced_split(train.labels, n, seed + 7)
    glass = glass_set(slide, n_glass, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pack(out, {"stage1": train.subset(idx), "glass": glass}, extra=artefact_arrays(images))
    return {"patches": len(idx), "glass": len(glass), "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.multiclass_data", description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    ap.add_argument("--slide", type=Path, default=Path("../shared/data/slides/kidney-48-5.tif"), help="glass source")
    ap.add_argument("--images", type=Path, default=Path("../shared/data/images"), help="artefact crops folder")
    ap.add_argument("--out", type=Path, default=Path("train-data/multiclass-pack.npz"), help="pack to write")
    ap.add_argument("--per-class", type=int, default=1200, help="PCam patches per class")
    ap.add_argument("--glass", type=int, default=200, help="glass patches")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    a = ap.parse_args(argv)
    print(json.dumps(build(a.zip, a.slide, a.images, a.out, a.per_class, a.glass, a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

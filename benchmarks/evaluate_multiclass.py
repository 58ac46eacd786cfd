"""Seed 003's and seed 002's comparisons on held-out four-class composites (never used in training).

Composites (:mod:`zoo.train.multiclass`) built from PCam *valid* patches, real glass and the artefact
crops, each predicted whole with overlapping tiles (torch, the trained state dicts; the ONNX files
are checked against them by ``zoo verify``):

* plain U-Net vs CD-UNET (seed 003 Table 2) per class, in H&E (seen) and recoloured to stains not
  seen in training (H-PAS, Giemsa, H-AEC; :mod:`zoo.train.stains`);
* single-level vs multi-level U-Net (seed 002's context claim) per class, in H&E.

    python benchmarks/evaluate_multiclass.py     # -> benchmarks/results/evaluation_multiclass.json
    python benchmarks/evaluate_multiclass.py --write-tests   # also the bundled test arrays
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.train import stains  # noqa: E402
from zoo.train.cd_unet import CDUNet  # noqa: E402
from zoo.train.multiclass import CLASSES, artefact_arrays, load_sources, per_class_dice, predict_canvas  # noqa: E402
from zoo.train.multilevel import CONTEXT_FACTOR, MultiLevelUNet  # noqa: E402
from zoo.train.pcam import read_pcam  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def load(net: torch.nn.Module, path: Path) -> torch.nn.Module:
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval()


def summarise(rows: list[list[float | None]]) -> dict[str, object]:
    """Per class mean and sd of Dice over composites; ``mean_foreground`` averages Tissue, Tumour, Exclude."""
    out: dict[str, object] = {}
    means = []
    for k, name in enumerate(CLASSES):
        vals = [r[k] for r in rows if r[k] is not None]
        out[name] = {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals)), 4)} if vals else None
        if vals and name != "Background":
            means.append(float(np.mean(vals)))
    per_comp = [np.mean([r[k] for k in (1, 2, 3) if r[k] is not None]) for r in rows]
    out["mean_foreground"] = {"mean": round(float(np.mean(per_comp)), 4), "sd": round(float(np.std(per_comp)), 4)}
    return out


def build_eval_pack(out: Path) -> None:
    """PCam valid patches, held-out glass (other seed) and the artefact crops, for a machine without shared/."""
    from zoo.train.pcam import save_pack
    from zoo.train.tumour_data import glass_set

    save_pack(
        out,
        {
            "stage1": read_pcam(SHARED / "pcam/pcam-ai4all-trainval.zip", "valid"),
            "glass": glass_set(SHARED / "slides/kidney-48-5.tif", 200, 99),
        },
        extra=artefact_arrays(SHARED / "images"),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--composites", type=int, default=8, help="held-out composites")
    ap.add_argument("--grid", type=int, default=20, help="cells per side (96 px each)")
    ap.add_argument("--state", type=Path, default=ROOT / "runs/gpu3", help="trained state dicts (cd/, ml/)")
    ap.add_argument("--pack", type=Path, default=None, help="evaluation pack (default: read shared/ directly)")
    ap.add_argument("--make-pack", type=Path, default=None, help="only write the evaluation pack here")
    ap.add_argument("--parts", nargs="+", default=["stain", "context"], help="stain (U-Net vs CD-UNET), context")
    ap.add_argument("--write-tests", action="store_true", help="write the bundled test arrays")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation_multiclass.json")
    a = ap.parse_args()
    if a.make_pack:
        build_eval_pack(a.make_pack)
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(2)
    pack = a.pack
    if pack is None:
        pack = Path(tempfile.mkdtemp()) / "eval.npz"
        build_eval_pack(pack)
    src = load_sources(pack, dev)  # valid patches as the tumour/non-tumour pools, held-out glass, artefacts
    src.grid = (a.grid, a.grid)
    gen = torch.Generator(device=dev).manual_seed(4242)
    canvases = [src.canvas(gen) for _ in range(a.composites)]
    res: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "composites": a.composites,
        "grid_cells": f"{a.grid} x {a.grid} cells of 96 px (~0.97 um/px): {a.grid * 96} px per side",
        "source": "PCam valid patches (never used in training), glass from kidney-48-5.tif (other seed), "
        "the 3 HistoQC artefact crops",
        "metric": "per-class Dice over labelled pixels (tissue/tumour seams ignored), mean (sd) over composites",
    }
    if a.out.exists():  # keep the other part's results
        old = json.loads(a.out.read_text())
        res.update({k: v for k, v in old.items() if k.endswith("_unet_vs_cd_unet") or k.startswith("context_")})
    t0 = time.perf_counter()
    if "stain" in a.parts:
        unet = load(CDUNet(colour_deconvolution=False), a.state / "cd/unet.pt").to(dev)
        cdunet = load(CDUNet(), a.state / "cd/cd-unet.pt").to(dev)
        stain_names = ("he", *stains.UNSEEN_STAINS)
        rows: dict[str, dict[str, list[list[float | None]]]] = {s: {"unet": [], "cd-unet": []} for s in stain_names}
        for img, label in canvases:
            for s in stain_names:
                im = img if s == "he" else stains.recolour(img[None], s)[0]
                for name, net in (("unet", unet), ("cd-unet", cdunet)):
                    p = predict_canvas(lambda t, c, n=net: n(t), im, 512)
                    rows[s][name].append(per_class_dice(p.argmax(0), label))
        res["stain_shift_unet_vs_cd_unet"] = {s: {n: summarise(r) for n, r in v.items()} for s, v in rows.items()}
        if a.write_tests:
            tile = canvases[0][0][None, :, 512:1024, 512:1024].contiguous()
            np.save(ROOT / "models/cd-unet/1.0.0/test_input.npy", tile.cpu().numpy())
            with torch.no_grad():
                np.save(ROOT / "models/cd-unet/1.0.0/test_expected.npy", cdunet(tile).cpu().numpy())
    if "context" in a.parts:
        single = load(CDUNet(colour_deconvolution=False, base=16), a.state / "ml/single-level-unet.pt").to(dev)
        multi = load(MultiLevelUNet(), a.state / "ml/multilevel-unet.pt").to(dev)
        ctx_rows: dict[str, list[list[float | None]]] = {"single-level-unet": [], "multilevel-unet": []}
        for img, label in canvases:
            p1 = predict_canvas(lambda t, c: single(t), img, 256)
            p2 = predict_canvas(lambda t, c: multi(t, c), img, 256, context=CONTEXT_FACTOR)
            ctx_rows["single-level-unet"].append(per_class_dice(p1.argmax(0), label))
            ctx_rows["multilevel-unet"].append(per_class_dice(p2.argmax(0), label))
        res["context_single_vs_multilevel_he"] = {n: summarise(r) for n, r in ctx_rows.items()}
        if a.write_tests:
            img = canvases[0][0]
            # a 256 px tile at (512, 512) and its context: the 1024 px around the same centre, 4x coarser
            ctx = torch.nn.functional.avg_pool2d(img[None, :, 128:1152, 128:1152], CONTEXT_FACTOR)
            hi = img[None, :, 512:768, 512:768].contiguous()
            np.savez_compressed(
                ROOT / "models/multilevel-unet/1.0.0/test_input.npz", image=hi.cpu().numpy(), context=ctx.cpu().numpy()
            )
            with torch.no_grad():
                np.save(ROOT / "models/multilevel-unet/1.0.0/test_expected.npy", multi(hi, ctx).cpu().numpy())
    res["seconds"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""colon-neoplasia on EBHI-Seg cases it never saw, through the runner, and on the shared slides (issue 25).

1. **Per image, through the runner's engine** (ONNX Runtime fp32): every image of the ``report`` split
   (15% of the cases, never used for a choice; :func:`zoo.train.colon.case_splits`), reflect-padded from
   224 px to the entry's 256 px tile. Per-class Dice pooled over the images, beside the "all epithelium is
   Neoplasia" baseline; per EBHI category, the share of the pathologist's mask called Neoplasia; per image,
   neoplastic when more of it is called Neoplasia than Benign: accuracy (95% interval resampling whole cases),
   sensitivity and specificity.
2. **``zoo run`` on mosaics** of the same report images (6 x 6 images, 1,344 px at 1.0 um/px, written as a
   tiled TIFF): per-class Dice of the whole pipeline (tissue pre-mask, overlapping tiles, blending) against
   the mosaic of masks. A picture (``docs/images/colon-neoplasia-mosaic.jpg``): 4 report images each of
   Normal, Polyp, Low-grade IN and Adenocarcinoma, beside their masks and zoo run's labels.
3. **``zoo run`` on every shared slide** (none is colorectal: what it calls there is out-of-domain
   behaviour): the share of the tissue (as ``tissue-multires`` finds it) called Benign and Neoplasia.

    python benchmarks/evaluate_colon.py       # benchmarks/results/evaluation_colon.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate_real_tissue import SHARED, SLIDES, tissue_of, write_tiff, zoo_run  # noqa: E402

from zoo.registry import ModelEntry, load_registry  # noqa: E402
from zoo.train import colon  # noqa: E402


def engine_labels(entry: ModelEntry, images: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, 224, 224) argmax class indices through the runner's engine (ONNX Runtime fp32), and ms per image."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights

    model = OnnxModel(verified_weights(entry, load_registry()), entry, ["CPUExecutionProvider"], 2)
    h = images.shape[1]
    padded, lo = colon.pad_to_tile(images, entry.input.patch_size_px[0])
    x = model.preprocess(padded)
    model.predict(x[:8])
    t = time.perf_counter()
    p = np.concatenate([model.predict(x[i : i + 32]) for i in range(0, len(x), 32)])
    ms = 1000 * (time.perf_counter() - t) / len(x)
    return p.argmax(1)[:, lo : lo + h, lo : lo + h].astype(np.uint8), ms


def image_calls(pred: np.ndarray) -> np.ndarray:
    """1 where an image has more Neoplasia pixels than Benign ones."""
    return ((pred == 2).sum((1, 2)) > (pred == 1).sum((1, 2))).astype(np.int64)


def case_bootstrap(cases: np.ndarray, correct: np.ndarray, n: int, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile interval of accuracy, resampling whole cases (images of one case are not independent)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(cases)
    by_case = [correct[cases == c] for c in ids]
    accs = []
    for _ in range(n):
        pick = rng.integers(0, len(ids), len(ids))
        accs.append(float(np.concatenate([by_case[i] for i in pick]).mean()))
    return {"accuracy": [round(float(np.percentile(accs, 2.5)), 4), round(float(np.percentile(accs, 97.5)), 4)]}


def per_image_figures(entry: ModelEntry, rep: colon.Ebhi, n_boot: int) -> dict[str, Any]:
    pred, ms = engine_labels(entry, rep.images)
    out: dict[str, Any] = {"images": len(pred), "cases": len(set(rep.cases)), "ms_per_image": round(ms, 2)}
    out["dice"] = colon.dice_figures(pred, rep.labels)
    cats = np.array(rep.categories)
    out["neoplasia_share_of_mask"] = {
        c: round(float((pred[cats == c][rep.labels[cats == c] > 0] == 2).mean()), 4) for c in sorted(set(cats))
    }
    truth = np.array([int(colon.GROUP[c] == 2) for c in cats])
    called = image_calls(pred)

    def fig(t: np.ndarray, c: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((t == c).mean()), "sensitivity": float(c[t == 1].mean()),
                "specificity": float(1 - c[t == 0].mean())}  # fmt: skip

    f = fig(truth, called)
    ci = case_bootstrap(np.array(rep.cases), (truth == called).astype(float), n_boot)
    out["image_level"] = {k: round(v, 4) for k, v in f.items()} | {"ci95": ci, "neoplastic_images": int(truth.sum())}
    return out


def mosaics(rep: colon.Ebhi, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Report images in order, ``side`` x ``side`` per mosaic (the last partial mosaic is dropped)."""
    per = side * side
    out = []
    for k in range(len(rep.images) // per):
        im, lab = rep.images[k * per : (k + 1) * per], rep.labels[k * per : (k + 1) * per]
        rows = [np.concatenate(list(im[r * side : (r + 1) * side]), 1) for r in range(side)]
        lrows = [np.concatenate(list(lab[r * side : (r + 1) * side]), 1) for r in range(side)]
        out.append((np.ascontiguousarray(np.concatenate(rows, 0)), np.concatenate(lrows, 0)))
    return out


def picture(entry: ModelEntry, rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path, px: int = 560) -> None:
    """JPEG of the image, the pathologists' masks and the model's labels (class colours at 50% over the image),
    side by side, each ``px`` wide."""
    from PIL import Image, ImageDraw, ImageFont

    colours = np.zeros((256, 3), np.float32)
    for c in entry.foreground:
        colours[c.index] = c.color
    panels = []
    for lab, title in ((None, "EBHI-Seg report cases"), (truth, "pathologists' masks"), (pred, "zoo run " + entry.id)):
        im = rgb.astype(np.float32)
        if lab is not None:
            a = (lab > 0)[..., None] * 0.5
            im = im * (1 - a) + colours[lab] * a
        tile = Image.fromarray(im.astype(np.uint8)).resize((px, px), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, 0, px, 30), fill=(255, 255, 255))
        draw.text((8, 4), title, fill=(0, 0, 0), font=ImageFont.load_default(size=20))
        panels.append(tile)
    out = Image.new("RGB", (px * 3 + 16, px), (255, 255, 255))
    for k, tile in enumerate(panels):
        out.paste(tile, (k * (px + 8), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=85)


def run_labels(entry: ModelEntry, rgb: np.ndarray, tif: Path, out: Path) -> tuple[np.ndarray, float]:
    """``zoo run`` on ``rgb`` written to ``tif`` at 1.0 um/px: its labels at ``rgb``'s size, and the job's seconds."""
    from PIL import Image

    from zoo.outputs import read_mask_tiff

    run = zoo_run(entry.id, write_tiff(tif, rgb, colon.EBHI_MPP), out)
    mask, _, _ = read_mask_tiff(Path(run["result_folder"]) / "mask.tiff")
    return np.asarray(Image.fromarray(mask).resize(rgb.shape[1::-1], Image.Resampling.NEAREST)), float(run["seconds"])


def mosaic_figures(entry: ModelEntry, rep: colon.Ebhi, work: Path, side: int, pic: Path | None) -> dict[str, Any]:
    preds, truths = [], []
    seconds = 0.0
    for k, (rgb, lab) in enumerate(mosaics(rep, side)):
        pred, s = run_labels(entry, rgb, work / f"ebhi_{k}.tif", work / "out-mosaics")
        preds.append(pred)
        truths.append(lab)
        seconds += s
    if pic is not None:  # one row per category, 4 report images each, so that both classes show
        cats = np.array(rep.categories)
        pick = np.concatenate([np.flatnonzero(cats == c)[:4] for c in ("Normal", "Polyp", "Low-grade IN",
                                                                      "Adenocarcinoma")])  # fmt: skip
        ((rgb, lab),) = mosaics(rep.subset(pick), 4)
        picture(entry, rgb, lab, run_labels(entry, rgb, work / "ebhi_picture.tif", work / "out-picture")[0], pic)
    return {"mosaics": len(preds), "px": side * 224, "mpp": colon.EBHI_MPP, "zoo_run_seconds": round(seconds, 1),
            "dice": colon.dice_figures(np.stack(preds), np.stack(truths))}  # fmt: skip


def slide_figures(entry: ModelEntry, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SLIDES:
        slide = SHARED / "slides" / name
        tissue = tissue_of(slide, work)
        run = zoo_run(entry.id, slide, work / "out-slides")
        row: dict[str, Any] = {"tissue_multires_tissue_mm2": tissue["area_mm2"]}
        for c in ("Benign", "Neoplasia"):
            f = float(run["classes"].get(c, {}).get("fraction", 0.0))
            row[f"{c.lower()}_fraction_of_tissue"] = round(min(1.0, f / tissue["fraction"]), 4)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    e = res["per_image"]
    d, m = e["dice"], res["mosaics"]["dice"]
    il = e["image_level"]
    lines = [
        f"# {res['model']} on EBHI-Seg report cases it never saw", "", f"`{res['command']}`", "",
        f"{e['images']} images from {e['cases']} cases; {il['neoplastic_images']} neoplastic.", "",
        "| | Background | Benign | Neoplasia | epithelium | all-epithelium-is-Neoplasia baseline (Neoplasia Dice) |",
        "|---|---|---|---|---|---|",
        f"| per image (engine) | {d['Background']} | {d['Benign']} | {d['Neoplasia']} | {d['epithelium']} | "
        f"{d['neoplasia_baseline_all_epithelium']} |",
        f"| zoo run, {res['mosaics']['mosaics']} mosaics of {res['mosaics']['px']} px | {m['Background']} | "
        f"{m['Benign']} | {m['Neoplasia']} | {m['epithelium']} | {m['neoplasia_baseline_all_epithelium']} |",
        "",
        f"Image level (more Neoplasia than Benign = neoplastic): accuracy {il['accuracy']} "
        f"[{il['ci95']['accuracy'][0]}, {il['ci95']['accuracy'][1]}], sensitivity {il['sensitivity']}, "
        f"specificity {il['specificity']}.", "",
        "| EBHI category | share of the pathologist's mask called Neoplasia |", "|---|---|",
        *[f"| {c} | {v} |" for c, v in e["neoplasia_share_of_mask"].items()],
        "", "## Shared slides (none colorectal: out of domain)", "",
        "| slide | tissue mm² | Benign share of tissue | Neoplasia share of tissue |", "|---|---|---|---|",
        *[f"| {s} | {r['tissue_multires_tissue_mm2']} | {r['benign_fraction_of_tissue']} | "
          f"{r['neoplasia_fraction_of_tissue']} |" for s, r in res["slides"].items()],
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="colon-neoplasia", help="NAME[@VERSION] of the entry")
    ap.add_argument("--zip", type=Path, default=SHARED / "ebhi-seg" / "ebhi-seg.zip", help="EBHI-Seg zip")
    ap.add_argument("--side", type=int, default=6, help="images per mosaic side")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--picture", type=Path, default=ROOT / "docs/images/colon-neoplasia-mosaic.jpg",
                    help="4 images of 4 categories, their masks and zoo run's labels, side by side (JPEG)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation_colon.json", help="JSON out")
    a = ap.parse_args()
    entry = load_registry().get(a.model)
    data = colon.read_ebhi(a.zip)
    rep = data.subset(colon.case_splits(data, 0)["report"])
    res: dict[str, Any] = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                           "model": entry.id}  # fmt: skip
    res["per_image"] = per_image_figures(entry, rep, a.bootstrap)
    print(json.dumps(res["per_image"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["mosaics"] = mosaic_figures(entry, rep, Path(tmp), a.side, a.picture)
        print(json.dumps(res["mosaics"]), flush=True)
        res["slides"] = slide_figures(entry, Path(tmp))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    a.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

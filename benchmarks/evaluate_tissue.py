"""Evaluate tissue models against baselines on the real slides and on exact-mask composites.

    python benchmarks/evaluate_tissue.py [--data ../shared/data] [--mpp 1 2 4 8]

Methods: ``tissue-multires`` (this project), Otsu on HSV saturation (H2G-Net's
baseline), FAST's own ``TissueSegmentation`` (pyfast), and the third-party
``peer-tissue-unet``. On slides there is no pathologist ground truth, so the table
reports Dice against the reference labeller that made the training labels (a
heuristic: read it as agreement) and pairwise agreement with ``tissue-multires``.
On composites (real held-out H&E tissue pasted on real glass) the mask is exact.
Writes ``benchmarks/results/evaluation.json`` and prints markdown tables.
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bridge.edits import dice  # noqa: E402
from zoo.engines.model import OnnxModel  # noqa: E402
from zoo.registry import load_registry, verified_weights  # noqa: E402
from zoo.runner import RunOptions, predict_slide  # noqa: E402
from zoo.slide import choose_level, model_dimensions, open_slide, read_scaled  # noqa: E402
from zoo.tissue import otsu_saturation_mask, reference_labels  # noqa: E402


def resize_mask(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)) > 0


def fast_tissue_segmentation(slide: Path) -> tuple[np.ndarray | None, float]:
    """FAST's TissueSegmentation on the slide (its own defaults), via pyfast in a child process."""
    from zoo.fastrun import fast_available, run_fast_pipeline

    if fast_available() is not None:
        return None, float("nan")
    fpl = (
        'PipelineName "FAST tissue segmentation"\n\n'
        "ProcessObject WSI WholeSlideImageImporter\nAttribute filename @@wsi@@\n\n"
        "ProcessObject seg TissueSegmentation\nInput 0 WSI 0\n\n"
        "ProcessObject exporter ImageFileExporter\nAttribute filename @@output@@\nInput 0 seg 0\n"
    )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "ts.fpl"
        p.write_text(fpl)
        out = Path(d) / "ts.png"
        try:
            secs = run_fast_pipeline(p, {"wsi": str(slide), "output": str(out)})
        except Exception as err:  # FAST cannot read every file (plain TIFF)
            print(f"FAST TissueSegmentation failed on {slide.name}: {err}", file=sys.stderr)
            return None, float("nan")
        a = np.asarray(Image.open(out))
    return (a[..., 0] if a.ndim == 3 else a) > 0, secs


def evaluate_slides(data: Path, mpps: list[float]) -> list[dict[str, Any]]:
    reg = load_registry()
    ours_e, peer_e = reg.get("tissue-multires"), reg.get("peer-tissue-unet")
    ours = OnnxModel(verified_weights(ours_e, reg), ours_e)
    peer = OnnxModel(verified_weights(peer_e, reg), peer_e)
    rows = []
    for path in sorted((data / "slides").iterdir()):
        try:
            slide = open_slide(path)
        except Exception as err:
            print(f"skip {path.name}: {err}", file=sys.stderr)
            continue
        with slide:
            t = time.perf_counter()
            peer_pred = predict_slide(slide, peer, RunOptions(progress=False))
            peer_s = time.perf_counter() - t
            fast_mask, fast_s = fast_tissue_segmentation(path)
            for mpp in mpps:
                t = time.perf_counter()
                pred = predict_slide(slide, ours, RunOptions(target_mpp=mpp, progress=False))
                ours_s = time.perf_counter() - t
                choice = choose_level(slide, target_mpp=mpp)
                w, h = model_dimensions(slide, choice)
                img = read_scaled(slide, choice, 0, 0, w, h)
                t = time.perf_counter()
                otsu = otsu_saturation_mask(img)
                otsu_s = time.perf_counter() - t
                ref = reference_labels(img)
                m = pred.mask.to_array() > 0
                methods = {
                    "tissue-multires": (m, ours_s),
                    "otsu-saturation": (otsu, otsu_s),
                    "peer-tissue-unet": (resize_mask(peer_pred.mask.to_array() > 0, m.shape), peer_s),
                }
                if fast_mask is not None:
                    methods["fast-TissueSegmentation"] = (resize_mask(fast_mask, m.shape), fast_s)
                row = {
                    "slide": path.name,
                    "mpp": round(choice.mpp, 3),
                    "mpp_assumed": choice.mpp_assumed,
                    "size_px": [w, h],
                    "tissue_fraction_ours": round(float(m.mean()), 4),
                    "dice_vs_reference": {k: round(dice(v[0], ref), 4) for k, v in methods.items()},
                    "dice_vs_tissue_multires": {
                        k: round(dice(v[0], m), 4) for k, v in methods.items() if k != "tissue-multires"
                    },
                    "seconds": {k: round(v[1], 3) for k, v in methods.items()},
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


def evaluate_composites(data: Path) -> dict[str, Any]:
    """Exact-mask composites of held-out tissue (hgsc_nest.jpg) on real glass, at native resolution."""
    from zoo.train.data import composite_samples, glass_from_slide

    reg = load_registry()
    e = reg.get("tissue-multires")
    model = OnnxModel(verified_weights(e, reg), e)
    glass = glass_from_slide(data / "slides" / "kidney-48-5.tif")
    samples = composite_samples([data / "images" / "hgsc_nest.jpg"], glass, np.random.default_rng(123), 12, 512)
    scores: dict[str, list[float]] = {"tissue-multires": [], "otsu-saturation": [], "reference-labeller": []}
    for s in samples:
        x = model.preprocess(_tiles(s.image))
        prob = _stitch(model.predict(x), s.image.shape[:2])
        scores["tissue-multires"].append(dice(prob >= e.output.threshold, s.label))
        scores["otsu-saturation"].append(dice(otsu_saturation_mask(s.image), s.label))
        scores["reference-labeller"].append(dice(reference_labels(s.image), s.label))
    return {
        k: {"mean_dice": round(float(np.mean(v)), 4), "min_dice": round(float(np.min(v)), 4), "n": len(v)}
        for k, v in scores.items()
    }


def _tiles(img: np.ndarray, p: int = 256) -> np.ndarray:
    h, w = img.shape[:2]
    return np.stack([img[y : y + p, x : x + p] for y in range(0, h, p) for x in range(0, w, p)])


def _stitch(probs: np.ndarray, shape: tuple[int, ...], p: int = 256) -> np.ndarray:
    h, w = shape[:2]
    out = np.zeros((h, w), np.float32)
    k = 0
    for y in range(0, h, p):
        for x in range(0, w, p):
            out[y : y + p, x : x + p] = probs[k, 0]
            k += 1
    return out


def markdown(rows: list[dict[str, Any]], comp: dict[str, Any]) -> str:
    methods: list[str] = []
    for r in rows:
        methods += [m for m in r["dice_vs_reference"] if m not in methods]
    lines = [
        "| slide | µm/px | " + " | ".join(f"{m} Dice (s)" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = [
            f"{r['dice_vs_reference'][m]:.3f} ({r['seconds'][m]:.2f})" if m in r["dice_vs_reference"] else "n/a"
            for m in methods
        ]
        mpp = f"{r['mpp']:g}{'*' if r['mpp_assumed'] else ''}"
        lines.append(f"| {r['slide']} | {mpp} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| composites (exact masks, held-out tissue) | mean Dice | min Dice | n |")
    lines.append("|---|---|---|---|")
    for k, v in comp.items():
        lines.append(f"| {k} | {v['mean_dice']:.3f} | {v['min_dice']:.3f} | {v['n']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared data folder")
    ap.add_argument("--mpp", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="resolutions to run at")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "evaluation.json", help="JSON out")
    a = ap.parse_args()
    rows = evaluate_slides(a.data, a.mpp)
    comp = evaluate_composites(a.data)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"slides": rows, "composites": comp}, indent=1))
    print(markdown(rows, comp))
    print(
        "\n* slide without resolution metadata: 0.5 µm/px assumed at level 0. Dice on slides is against the "
        "reference labeller (heuristic), composites against exact masks."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every registered model that calls tumour, on real tissue it never saw (issue 25).

1. Patch classifiers (``patch-classification`` and a cascade's first stage) on PCam ``valid`` (real
   lymph-node H&E, pathologists' labels; never trained on), at the entry's threshold (and at 0.5):
   accuracy, sensitivity, specificity, AUC,
   calibration error, with 95% bootstrap intervals, on the ``report`` half (the half that 1.1's
   training never used, not even for early stopping or the threshold) and on all of ``valid``; ms per
   patch through the runner's own engine.
2. Whole models through ``zoo run`` on two real lymph-node mosaics: 20 x 20 PCam ``valid`` patches of one
   label each (tumour-free and all-tumour; every patch randomly rotated/flipped), written as a TIFF at
   PCam's 0.972 um/px: the fraction of called tissue that each model calls Tumor. On the tumour-free
   mosaic every Tumor pixel is a false positive; beside it the all-tumour baseline's Dice.
3. ``zoo run`` on every shared slide (none is a lymph node: tumour called there is out-of-domain
   behaviour): Tumor area and its fraction of the tissue that ``tissue-multires`` finds.
4. Every engine and precision a patch classifier's entry allows, on all of PCam valid: labels agreeing with
   ONNX Runtime fp32 at the entry's threshold, the largest probability difference, ms per patch.
5. ``zoo run`` on held-out *seamless* composites (:mod:`zoo.train.seamless`, woven from the PCam valid
   ``report`` half on real glass, 1024 px at 0.972 um/px, exact masks; never trained on): each model's
   Tumor Dice beside the "everything is tumour" baseline (every true tissue pixel called Tumor), and the
   fraction of tissue called Tumor on tumour-free composites.

    python benchmarks/evaluate_real_tissue.py            # benchmarks/results/evaluation_real_tissue.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.registry import ModelEntry, load_registry  # noqa: E402
from zoo.train.pcam import PCAM_MPP, JpegSet, read_pcam  # noqa: E402
from zoo.train.pcam_recipe import binary_figures, bootstrap_ci, pcam_splits  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SLIDES = ["cmu-1-small-region.svs", "kidney-48-5.tif", "tcga-cr-7395-01a-01-ts1.svs"]


def tumour_models(names: list[str] | None) -> list[ModelEntry]:
    """Every registered entry with a Tumor class (or those named, NAME@VERSION)."""
    reg = load_registry()
    if names:
        return [reg.get(n) for n in names]
    return [m for m in reg.models if any(c.name == "Tumor" for c in m.classes)]


def tumour_probability(entry: ModelEntry, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The first stage's Tumor probability per (N, 96, 96, 3) patch through the runner's engine (ONNX Runtime
    fp32), and ms per patch."""
    from zoo.engines.model import OnnxModel
    from zoo.registry import verified_weights

    reg = load_registry()
    model = OnnxModel(verified_weights(entry, reg), entry, ["CPUExecutionProvider"], 2)
    k = sorted(entry.classes, key=lambda c: c.index).index(next(c for c in entry.classes if c.name == "Tumor"))
    x = model.preprocess(images)
    model.predict(x[:64])
    t = time.perf_counter()
    p = np.concatenate([model.predict(x[i : i + 128])[:, k, 0, 0] for i in range(0, len(x), 128)])
    return p.astype(np.float64), 1000 * (time.perf_counter() - t) / len(x)


def patch_figures(entries: list[ModelEntry], zip_path: Path, n_boot: int) -> dict[str, Any]:
    sp = pcam_splits(zip_path, 0)
    valid = read_pcam(zip_path, "valid")
    sets = {"report_half": sp.report, "valid_all": valid}
    decoded = {k: (v.decode(), v.labels) for k, v in sets.items()}
    out: dict[str, Any] = {}
    for e in entries:
        if e.output.layout != "NC":
            continue
        row: dict[str, Any] = {}
        for name, (x, y) in decoded.items():
            p, ms = tumour_probability(e, x)
            t = e.output.threshold  # the entry's operating point, as the runner applies it
            row[name] = {**binary_figures(p, y, t), "threshold": t, "ci95": bootstrap_ci(p, y, t, n_boot),
                         "at_0.5": binary_figures(p, y), "ms_per_patch": round(ms, 3)}  # fmt: skip
        out[e.id] = row
        print(e.id, json.dumps(row["report_half"]), flush=True)
    return out


def precision_figures(entries: list[ModelEntry], zip_path: Path) -> dict[str, Any]:
    """Every (engine, precision) a patch classifier's entry allows, on all 3,000 PCam valid patches: ms per
    patch (batches of 64), labels agreeing with ONNX Runtime fp32 at the entry's threshold, the largest
    probability difference, accuracy."""
    from zoo.engines.model import OnnxModel
    from zoo.engines.select import engine_unavailable
    from zoo.registry import verified_weights

    reg = load_registry()
    valid = read_pcam(zip_path, "valid")
    images, y = valid.decode(), valid.labels
    out: dict[str, Any] = {}
    for e in entries:
        if e.output.layout != "NC":
            continue
        t, ref = e.output.threshold, None
        pairs = [("onnxruntime", "fp32")] + [(g, p) for p, spec in e.precisions.items() for g in spec.engines
                                             if (g, p) != ("onnxruntime", "fp32")]  # fmt: skip
        for engine, precision in pairs:
            key = f"{e.id} {engine} {precision}"
            why = engine_unavailable(engine, precision)
            if why:
                out[key] = {"skipped": why}
                continue
            path = verified_weights(e, reg, precision)
            model = OnnxModel(path, e, ["CPUExecutionProvider"], 2, None, engine, precision, 64)
            x = model.preprocess(images)
            model.predict(x[:64])  # warm-up
            t0 = time.perf_counter()
            p = np.concatenate([model.predict(x[i : i + 64])[:, 1, 0, 0] for i in range(0, len(x), 64)])
            ms = 1000 * (time.perf_counter() - t0) / len(x)
            ref = p if ref is None else ref
            out[key] = {
                "ms_per_patch": round(ms, 3),
                "labels_agreeing_with_onnxruntime_fp32": round(float(((p >= t) == (ref >= t)).mean()), 5),
                "max_abs_probability_difference": round(float(np.abs(p - ref).max()), 5),
                "accuracy": round(float(((p >= t) == (y == 1)).mean()), 4),
            }
            print(key, json.dumps(out[key]), flush=True)
    return out


def mosaic(patches: JpegSet, side: int, seed: int) -> np.ndarray:
    """``side`` x ``side`` patches, each randomly rotated by a multiple of 90 degrees and maybe flipped."""
    rng = np.random.default_rng(seed)
    imgs = patches.decode()[rng.choice(len(patches), side * side, replace=False)]
    rows = []
    for r in range(side):
        row = []
        for c in range(side):
            im = np.rot90(imgs[r * side + c], int(rng.integers(4)))
            row.append(im[:, ::-1] if rng.integers(2) else im)
        rows.append(np.concatenate(row, 1))
    return np.ascontiguousarray(np.concatenate(rows, 0))


def write_tiff(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    import tifffile

    tifffile.imwrite(
        path, rgb, photometric="rgb", tile=(256, 256), compression="jpeg", compressionargs={"level": 95},
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


#: ``--precision P`` for the tumour models' runs (``--precision``; the tissue model always runs as ``auto``)
MODEL_ARGS: list[str] = []


def zoo_run(model: str, slide: Path, out: Path, *extra: str) -> dict[str, Any]:
    """``zoo run`` in a child process; its run.json."""
    cmd = [sys.executable, "-m", "zoo.cli", "run", model, str(slide), "--out", str(out), "--json", "--no-progress"]
    extra = (*extra, *MODEL_ARGS) if not model.startswith("tissue-multires") else extra
    r = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"zoo run {model} {slide}: {r.stderr.strip()}")
    res = json.loads(r.stdout)[0]
    info: dict[str, Any] = json.loads((Path(res["out"]) / "run.json").read_text())
    info["result_folder"] = res["out"]
    return info


def tumour_share(run: dict[str, Any], tissue_fraction: float) -> dict[str, float | None]:
    """Tumor's area and its share of the tissue (``tissue_fraction`` of the image, from tissue-multires)."""
    tum = run["classes"].get("Tumor", {})
    f = float(tum.get("fraction", 0.0))
    return {
        "tumour_fraction_of_tissue": round(min(1.0, f / tissue_fraction), 4) if tissue_fraction else None,
        "tumour_area_mm2": tum.get("area_mm2"),
        "tumour_fraction_of_image": round(f, 4),
    }


def tissue_of(path: Path, work: Path) -> dict[str, float]:
    return zoo_run("tissue-multires", path, work / "out-tissue")["classes"]["Tissue"]


def mosaic_figures(entries: list[ModelEntry], zip_path: Path, work: Path, side: int) -> dict[str, Any]:
    sp = pcam_splits(zip_path, 0)
    rep = sp.report
    out: dict[str, Any] = {}
    paths, tissue = {}, {}
    for label, name in ((0, "tumour_free"), (1, "all_tumour")):
        sub = rep.subset(np.flatnonzero(rep.labels == label))
        paths[name] = write_tiff(work / f"pcam_{name}.tif", mosaic(sub, side, 7 + label), PCAM_MPP)
        tissue[name] = tissue_of(paths[name], work)["fraction"]
    for e in entries:
        row: dict[str, Any] = {}
        for name, path in paths.items():
            row[name] = tumour_share(zoo_run(e.id, path, work / f"out-{e.name}-{e.version}"), tissue[name])
        free = row["tumour_free"]["tumour_fraction_of_tissue"] or 0.0
        tum = row["all_tumour"]["tumour_fraction_of_tissue"] or 0.0
        # Tumor Dice over both mosaics (equal tissue in each): the model's, and the all-Tumor baseline's (2/3)
        row["dice_on_both_mosaics"] = round(2 * tum / (2 * tum + free + (1 - tum)), 4)
        row["dice_all_tumour_baseline"] = round(2 / 3, 4)
        out[e.id] = row
        print(e.id, json.dumps(row), flush=True)
    return {"mosaic_px": side * 96, "patches_per_mosaic": side * side, "tissue_fraction": tissue,
            "source": "PCam valid, report half", **out}  # fmt: skip


def slide_figures(entries: list[ModelEntry], work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SLIDES:
        slide = SHARED / "slides" / name
        tissue = tissue_of(slide, work)
        row: dict[str, Any] = {"tissue_multires_tissue_mm2": tissue["area_mm2"]}
        for e in entries:
            row[e.id] = tumour_share(zoo_run(e.id, slide, work / f"out-{e.name}-{e.version}"), tissue["fraction"])
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def seamless_set(zip_path: Path, n: int, seed: int = 500) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` held-out seamless composites with tumour and ``n // 2`` without, as (RGB uint8, labels) pairs."""
    import torch

    from zoo.train import seamless
    from zoo.train.tumour_data import glass_patches

    rep = pcam_splits(zip_path, 0).report
    x = torch.from_numpy(np.ascontiguousarray(rep.decode().transpose(0, 3, 1, 2)))
    y = torch.from_numpy(rep.labels)
    tum, nor = x[y == 1], x[y == 0]
    glass = torch.from_numpy(np.ascontiguousarray(glass_patches(SHARED / "slides/kidney-48-5.tif", 300, seed)
                                                  .transpose(0, 3, 1, 2)))  # fmt: skip
    feats = (seamless.colour_features(tum), seamless.colour_features(nor))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n + n // 2):
        free = 1.0 if k >= n else 0.0
        c = seamless.composite(tum, nor, glass, 1024, gen, p_tumour_free=free, features=feats)
        if k < n and not (c.label == seamless.TUMOUR).any():
            continue
        rgb = (c.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        out.append((rgb, c.label.numpy()))
    return out


def seamless_figures(entries: list[ModelEntry], zip_path: Path, work: Path, n: int) -> dict[str, Any]:
    """Tumor Dice (and the all-tumour baseline) on composites with tumour; Tumor called on tumour-free ones."""
    from PIL import Image

    from zoo.outputs import read_mask_tiff
    from zoo.train import seamless

    comps = seamless_set(zip_path, n)
    paths = [write_tiff(work / f"seamless_{k}.tif", rgb, PCAM_MPP) for k, (rgb, _) in enumerate(comps)]
    with_tumour = sum(bool((lab == seamless.TUMOUR).any()) for _, lab in comps)
    out: dict[str, Any] = {
        "composites_with_tumour": with_tumour, "tumour_free_composites": len(comps) - with_tumour, "px": 1024,
        "source": "PCam valid report half woven into seamless composites (zoo.train.seamless), never trained on",
    }  # fmt: skip
    for e in entries:
        tumour_index = next(c.index for c in e.classes if c.name == "Tumor")
        dice, base, free = [], [], []
        for path, (_, lab) in zip(paths, comps, strict=True):
            run = zoo_run(e.id, path, work / f"out-seamless-{e.name}-{e.version}")
            mask, _, _ = read_mask_tiff(Path(run["result_folder"]) / "mask.tiff")
            full = np.asarray(Image.fromarray(mask).resize(lab.shape[::-1], Image.Resampling.NEAREST))
            called, keep = full == tumour_index, lab != seamless.IGNORE
            truth = (lab == seamless.TUMOUR) & keep
            tissue = ((lab == seamless.TUMOUR) | (lab == seamless.TISSUE)) & keep
            if truth.any():
                dice.append(2 * float((called & truth).sum()) / float(called[keep].sum() + truth.sum()))
                base.append(2 * float(truth.sum()) / float(tissue.sum() + truth.sum()))
            else:
                free.append(float((called & tissue).sum()) / max(1.0, float(tissue.sum())))
        row = {
            "tumour_dice": round(float(np.mean(dice)), 4),
            "all_tumour_baseline_dice": round(float(np.mean(base)), 4),
            "dice_gain_over_baseline": round(float(np.mean(dice) - np.mean(base)), 4),
            "tumour_called_on_tumour_free_tissue": round(float(np.mean(free)), 4),
        }
        out[e.id] = row
        print(e.id, json.dumps(row), flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    """The parts that ran, as Markdown tables."""
    lines = ["# Real tissue, every tumour model", "", f"`{res['command']}`", ""]
    if "pcam" in res:
        lines += ["## PCam valid, report half (1,500 real lymph-node patches)", "",
                  "| model | accuracy [95% CI] | AUC [95% CI] | sensitivity | specificity | ECE | ms/patch |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mid, r in res["pcam"].items():
            f = r["report_half"]
            lines.append(
                f"| {mid} | {f['accuracy']:.3f} [{f['ci95']['accuracy'][0]:.3f}, {f['ci95']['accuracy'][1]:.3f}] | "
                f"{f['auc']:.3f} [{f['ci95']['auc'][0]:.3f}, {f['ci95']['auc'][1]:.3f}] | {f['sensitivity']:.3f} | "
                f"{f['specificity']:.3f} | {f['ece']:.3f} | {f['ms_per_patch']:.2f} |"
            )
    if "mosaics" in res:
        m = res["mosaics"]
        lines += ["", f"## Real lymph-node mosaics ({m['mosaic_px']} px, {m['patches_per_mosaic']} PCam patches each)",
                  "", "| model | Tumor on tumour-free tissue | Tumor on all-tumour tissue | Dice | all-Tumor Dice |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for mid, r in m.items():
            if isinstance(r, dict) and isinstance(r.get("tumour_free"), dict):
                lines.append(
                    f"| {mid} | {r['tumour_free']['tumour_fraction_of_tissue']} | "
                    f"{r['all_tumour']['tumour_fraction_of_tissue']} | {r['dice_on_both_mosaics']} | "
                    f"{r['dice_all_tumour_baseline']} |"
                )
    if "precisions" in res:
        lines += ["", "## Engines and precisions on all 3,000 PCam valid patches", "",
                  "| model, engine, precision | ms/patch | labels as fp32 ONNX Runtime | max abs diff | accuracy |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for key, r in res["precisions"].items():
            if "skipped" not in r:
                lines.append(f"| {key} | {r['ms_per_patch']} | {r['labels_agreeing_with_onnxruntime_fp32']} | "
                             f"{r['max_abs_probability_difference']} | {r['accuracy']} |")  # fmt: skip
    if "seamless" in res:
        sm = res["seamless"]
        lines += ["", f"## Held-out seamless composites ({sm['composites_with_tumour']} with tumour, "
                  f"{sm['tumour_free_composites']} without; 1024 px at 0.972 um/px)", "",
                  "| model | Tumor Dice | all-tumour baseline Dice | gain | Tumor on tumour-free tissue |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for mid, r in sm.items():
            if isinstance(r, dict) and "tumour_dice" in r:
                cells = ("tumour_dice", "all_tumour_baseline_dice", "dice_gain_over_baseline",
                         "tumour_called_on_tumour_free_tissue")  # fmt: skip
                lines.append(f"| {mid} | " + " | ".join(str(r[c]) for c in cells) + " |")
    if "slides" in res:
        lines += ["", "## Shared slides (none is a lymph node): Tumor as a fraction of tissue-multires' tissue", ""]
        ids = [e for e in next(iter(res["slides"].values())) if e != "tissue_multires_tissue_mm2"]
        lines += ["| slide | " + " | ".join(ids) + " |", "|---" * (len(ids) + 1) + "|"]
        for name, row in res["slides"].items():
            lines.append(f"| {name} | " + " | ".join(str(row[i]["tumour_fraction_of_tissue"]) for i in ids) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="NAME@VERSION (default: every model with a Tumor class)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--mosaic-side", type=int, default=20, help="patches per side of each mosaic")
    ap.add_argument("--seamless", type=int, default=8, help="seamless composites with tumour (half as many without)")
    ap.add_argument("--parts", nargs="*", default=["pcam", "precisions", "mosaics", "slides", "seamless"],
                    help="which parts to run")  # fmt: skip
    ap.add_argument("--precision", default="auto", help="zoo run --precision for the tumour models' first network")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation_real_tissue.json")
    a = ap.parse_args()
    if a.precision != "auto":
        MODEL_ARGS[:] = ["--precision", a.precision]
    zip_path = SHARED / "pcam/pcam-ai4all-trainval.zip"
    entries = tumour_models(a.models)
    res: dict[str, Any] = {"command": "python benchmarks/evaluate_real_tissue.py " + " ".join(sys.argv[1:])}
    if "pcam" in a.parts:
        res["pcam"] = patch_figures(entries, zip_path, a.bootstrap)
    if "precisions" in a.parts:
        res["precisions"] = precision_figures(entries, zip_path)
    with tempfile.TemporaryDirectory(prefix="zoo-eval-") as tmp:
        if "mosaics" in a.parts:
            res["mosaics"] = mosaic_figures(entries, zip_path, Path(tmp), a.mosaic_side)
        if "slides" in a.parts:
            res["slides"] = slide_figures(entries, Path(tmp))
        if "seamless" in a.parts:
            res["seamless"] = seamless_figures(entries, zip_path, Path(tmp), a.seamless)
    a.out.write_text(json.dumps(res, indent=1))
    a.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

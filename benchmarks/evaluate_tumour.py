"""Evaluate tumour-tiles and tumour-h2g on data their training never saw; write the bundled tests.

* PCam ``valid`` split (1,500 tumour + 1,500 non-tumour patches): accuracy, AUC, recall, precision
  of each patch classifier (ONNX Runtime, fp32), and what seed 001's entropy rails keep.
* Held-out composite slides (:mod:`zoo.train.composites`) built only from ``valid`` patches and real
  glass: pixel Dice, precision and recall at 1024x1024 of H2G stage 1 alone (heatmap >= 0.5),
  stage 1 + refinement (the paper's ablation), tumour-tiles (per-cell probability, rails applied),
  and seed 004's Otsu baseline (Otsu threshold of HSV saturation, which finds tissue, not tumour).
* torch vs ONNX Runtime on real patches, when the training state dicts are at ``--state``.

    python benchmarks/evaluate_tumour.py            # writes benchmarks/results/evaluation_tumour.json
    python benchmarks/evaluate_tumour.py --write-tests   # also the models' bundled test arrays
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from scipy.stats import mannwhitneyu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.kinds.patch_classification import grey_entropy_bits  # noqa: E402
from zoo.tissue import otsu_saturation_mask  # noqa: E402
from zoo.train import composites  # noqa: E402
from zoo.train.h2g import CompositeSource  # noqa: E402
from zoo.train.pcam import read_pcam  # noqa: E402
from zoo.train.tumour_data import glass_patches  # noqa: E402
from zoo.train.tumour_tiles import learn_rails  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TILES = ROOT / "models/tumour-tiles/1.0.0/tumour-tiles.onnx"
PATCHES = ROOT / "models/tumour-h2g/1.0.0/patches.onnx"
REFINE = ROOT / "models/tumour-h2g/1.0.0/refine.onnx"


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def classify(sess: ort.InferenceSession, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        out.append(sess.run(None, {"image": x})[0][:, 1])
    return np.concatenate(out)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U of tumour vs non-tumour scores over n1 * n0 (ties count half)."""
    pos = label == 1
    return float(mannwhitneyu(score[pos], score[~pos]).statistic / (pos.sum() * (~pos).sum()))


def patch_metrics(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    pred = prob >= 0.5
    tp, fp, fn = int((pred & (label == 1)).sum()), int((pred & (label == 0)).sum()), int((~pred & (label == 1)).sum())
    return {
        "accuracy": round(float((pred == (label == 1)).mean()), 4),
        "auc": round(auc(prob, label), 4),
        "recall": round(tp / max(1, tp + fn), 4),
        "precision": round(tp / max(1, tp + fp), 4),
    }


def precision_agreement(images: np.ndarray) -> dict[str, dict[str, object]]:
    """Per patch classifier, engine and precision the runner offers: ms per patch (batches of 64) and how
    many PCam valid labels agree with ONNX Runtime fp32 (the registry asks >= 0.999 of a precision)."""
    from zoo.engines.model import OnnxModel
    from zoo.engines.select import engine_unavailable
    from zoo.registry import load_registry

    reg = load_registry()
    out: dict[str, dict[str, object]] = {}
    for name in ("tumour-tiles", "tumour-h2g"):
        entry = reg.get(name)
        ref: np.ndarray | None = None
        for engine, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
            key = f"{name} {engine} {precision}"
            why = engine_unavailable(engine, precision)
            if why:
                out[key] = {"skipped": why}
                continue
            model = OnnxModel(
                reg.resolve(entry.weights.uri), entry, ["CPUExecutionProvider"], 2, None, engine, precision
            )
            x = model.preprocess(images)
            model.predict(x[:64])  # warm-up
            t = time.perf_counter()
            p = np.concatenate([model.predict(x[i : i + 64])[:, 1, 0, 0] for i in range(0, len(x), 64)])
            ms = 1000 * (time.perf_counter() - t) / len(x)
            ref = p if ref is None else ref
            out[key] = {
                "ms_per_patch": round(ms, 3),
                "labels_agreeing_with_onnxruntime_fp32": round(float(((p >= 0.5) == (ref >= 0.5)).mean()), 5),
                "max_abs_probability_difference": round(float(np.abs(p - ref).max()), 5),
            }
    return out


def seg_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    return {
        "dice": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--composites", type=int, default=40, help="held-out composites")
    ap.add_argument(
        "--patches", type=Path, default=PATCHES, help="the cascade's stage-1 ONNX (1.1.0: tumour-tiles 1.2.0's)"
    )
    ap.add_argument("--state", type=Path, default=ROOT / "runs/gpu1", help="training state dicts (optional)")
    ap.add_argument("--write-tests", action="store_true", help="write the bundled test arrays")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation_tumour.json")
    a = ap.parse_args()
    zip_path = SHARED / "pcam/pcam-ai4all-trainval.zip"
    valid = read_pcam(zip_path, "valid")
    images, labels = valid.decode(), valid.labels
    learned = learn_rails(zip_path)  # as registered (rounded to 4 decimals), so as the runner applies them
    rails = (learned["min_bits"], learned["max_bits"])
    res: dict[str, object] = {
        "stage1_onnx": str(a.patches.relative_to(ROOT) if a.patches.is_relative_to(ROOT) else a.patches),
        "pcam_valid": {"tumour": int((labels == 1).sum()), "non_tumour": int((labels == 0).sum())},
    }

    s_tiles, s_patches, s_refine = session(TILES), session(a.patches), session(REFINE)
    t = time.perf_counter()
    p_tiles = classify(s_tiles, images)
    t_tiles = time.perf_counter() - t
    t = time.perf_counter()
    p_h2g = classify(s_patches, images)
    t_h2g = time.perf_counter() - t
    h_valid = grey_entropy_bits(images)
    inside = (h_valid >= rails[0]) & (h_valid <= rails[1])
    m_tiles = patch_metrics(p_tiles, labels)
    m_tiles_rails = patch_metrics(np.where(inside, p_tiles, 0.0), labels)
    res["tumour_tiles"] = {
        "patch_metrics_pcam_valid": m_tiles,
        "patch_metrics_pcam_valid_with_rails": m_tiles_rails,
        "entropy_rails_bits": [round(rails[0], 4), round(rails[1], 4)],
        "rails_keep_tumour_fraction": round(float(inside[labels == 1].mean()), 4),
        "rails_remove_non_tumour_fraction": round(float(1 - inside[labels == 0].mean()), 4),
        "ms_per_patch_onnxruntime_2_threads": round(1000 * t_tiles / len(images), 3),
    }
    res["tumour_h2g"] = {
        "stage1_patch_metrics_pcam_valid": patch_metrics(p_h2g, labels),
        "stage1_ms_per_patch_onnxruntime_2_threads": round(1000 * t_h2g / len(images), 3),
    }
    res["precisions_pcam_valid"] = precision_agreement(images)

    # torch vs ONNX on real patches
    if (a.state / "h2g/patches.pt").exists():
        from zoo.train.h2g import PatchClassifier, RefinementUNet
        from zoo.train.tumour_tiles import TileCNN

        x = torch.from_numpy(images[:64].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        diffs = {}
        for name, net, state, sess in (
            ("tumour_tiles", TileCNN(), a.state / "tiles/tiles.pt", s_tiles),
            ("tumour_h2g_patches", PatchClassifier(), a.state / "h2g/patches.pt", s_patches),
        ):
            net.load_state_dict(torch.load(state, map_location="cpu"))
            with torch.no_grad():
                ref = net.eval()(x).numpy()
            diffs[name] = float(np.abs(ref - sess.run(None, {"image": x.numpy()})[0]).max())
        res["onnx_vs_torch_max_abs_diff_64_valid_patches"] = diffs
        refine_net = RefinementUNet()
        refine_net.load_state_dict(torch.load(a.state / "h2g/refine.pt", map_location="cpu"))
    else:
        refine_net = None

    # held-out composites from valid patches only
    dev = torch.device("cpu")
    tum, nor = labels == 1, labels == 0
    pool = lambda m: torch.from_numpy(np.ascontiguousarray(images[m].transpose(0, 3, 1, 2)))  # noqa: E731
    glass = torch.from_numpy(
        glass_patches(SHARED / "slides/kidney-48-5.tif", 200, seed=99).transpose(0, 3, 1, 2).copy()
    )
    src = CompositeSource(
        pool(tum), pool(nor), glass, torch.from_numpy(p_h2g[tum]), torch.from_numpy(p_h2g[nor]), out_px=1024
    )
    tiles_t = torch.from_numpy(np.where(inside, p_tiles, 0.0)[tum].astype(np.float32))
    tiles_n = torch.from_numpy(np.where(inside, p_tiles, 0.0)[nor].astype(np.float32))
    gen = torch.Generator().manual_seed(12345)
    rows: dict[str, list[dict[str, float]]] = {
        "stage1_alone": [],
        "stage1_plus_refinement": [],
        "tumour_tiles": [],
        "otsu_saturation": [],
    }
    refine_s = []
    test_pair = None
    for _ in range(a.composites):
        g = int(torch.randint(24, 65, (1,), generator=gen))
        comp = composites.layout(g, int(tum.sum()), int(nor.sum()), len(glass), gen, dev)
        img = composites.render(comp, src.tumour, src.normal, src.glass, 1024)
        heat = composites.cell_map(composites.heat_of(comp, src.tumour_prob, src.normal_prob), 1024)
        truth = composites.cell_map((comp.cells == 1).long(), 1024, mode="nearest").numpy() > 0.5
        feeds = {"image": img[None].numpy(), "heatmap": heat[None, None].numpy() / 255.0}
        t = time.perf_counter()
        refined = s_refine.run(None, feeds)[0][0, 1]
        refine_s.append(time.perf_counter() - t)
        tt = composites.cell_map(composites.heat_of(comp, tiles_t, tiles_n), 1024, mode="nearest").numpy()
        rgb = (img.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        rows["stage1_alone"].append(seg_metrics(heat.numpy() >= 0.5, truth))
        rows["stage1_plus_refinement"].append(seg_metrics(refined >= 0.5, truth))
        rows["tumour_tiles"].append(seg_metrics(tt >= 0.5, truth))
        rows["otsu_saturation"].append(seg_metrics(otsu_saturation_mask(rgb), truth))
        if test_pair is None and truth.any():  # quantised to 8 bits so the compressed file stays small
            q = lambda a: (np.round(a * 255) / 255).astype(np.float32)  # noqa: E731
            test_pair = {"image": q(feeds["image"]), "heatmap": (q(feeds["heatmap"] * 255) / 255).astype(np.float32)}
    summary = {
        name: {
            m: {
                "mean": round(float(np.mean([r[m] for r in rs])), 4),
                "std": round(float(np.std([r[m] for r in rs])), 4),
            }
            for m in ("dice", "precision", "recall")
        }
        for name, rs in rows.items()
    }
    res["heldout_composites"] = {
        "n": a.composites,
        "grid_cells": "24-64 per side, 96 px cells (~0.97 um/px), rendered at 1024x1024",
        "source": "PCam valid patches (never used in training) and glass from kidney-48-5.tif",
        "metrics": summary,
        "refinement_seconds_per_composite_onnxruntime_2_threads": round(float(np.median(refine_s)), 3),
    }
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))

    if a.write_tests:
        order = np.concatenate([np.flatnonzero(tum)[:4], np.flatnonzero(nor)[:4]])
        xt = images[order].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        for folder, sess, stem in (
            (TILES.parent, s_tiles, "test"),
            (PATCHES.parent, s_patches, "test_patches"),
        ):
            np.save(folder / f"{stem}_input.npy", xt)
            np.save(folder / f"{stem}_expected.npy", sess.run(None, {"image": xt})[0])
        assert test_pair is not None
        np.savez_compressed(REFINE.parent / "test_refine_input.npz", **test_pair)
        np.save(REFINE.parent / "test_refine_expected.npy", s_refine.run(None, test_pair)[0].astype(np.float16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

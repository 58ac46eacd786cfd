"""Colorectal biopsy epithelium (EBHI-Seg): benign glands vs neoplasia, trained on pathologists' masks.

EBHI-Seg (``shared/data/ebhi-seg/ebhi-seg.zip``, CC-BY-4.0): 2,226 H&E images of enteroscope biopsies,
224 x 224 px, each from one of six categories (Normal, Polyp, Low-grade IN, High-grade IN, Serrated
adenoma, Adenocarcinoma) with a pathologist's mask of that category's glands or lesion. Every masked
pixel takes its image's group, everything else is Background (stroma, lumen, mucus, glass):

* 1 ``Benign`` (Normal, Polyp): 550 images;
* 2 ``Neoplasia`` (Low-grade IN, High-grade IN, Serrated adenoma, Adenocarcinoma): 1,676 images.

The dataset states no pixel size (its file names say 400x). The median diameter of the 913 whole, roundish
crypt cross-sections in the Normal and Polyp masks is 63 px (25th-75th percentile 56-70 px; ``python -m
zoo.train.colon mpp``), against the 55-70 um of human colonic crypts: the images are about 1 um/px
(0.9-1.1), and the model runs at 1.0 um/px.

Splits are by case (the ``GT...`` prefix of a file name; 365 cases), seeded: 70% train, 15% ``select``
(best step), 15% ``report`` (the figures; never used for a choice). Network: the quarter-width U-Net of
:mod:`zoo.train.cd_unet` (no colour deconvolution), 3 classes. Training: AdamW one-cycle, bf16 autocast,
balanced sampling of the two groups, the 8 dihedral transforms, HED jitter, brightness/contrast.

    python -m zoo.train.colon train --out train-data/colon   # colon.pt + train.json
    python -m zoo.train.colon export --state train-data/colon --out models/colon-neoplasia/1.0.0 \
        --test-from ../shared/data/ebhi-seg/ebhi-seg.zip
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zoo.train import stains
from zoo.train.cd_unet import CDUNet

CLASSES = ("Background", "Benign", "Neoplasia")
GROUP = {"Normal": 1, "Polyp": 1, "Low-grade IN": 2, "High-grade IN": 2, "Serrated adenoma": 2, "Adenocarcinoma": 2}
EBHI_MPP = 1.0
ZIP = Path("../shared/data/ebhi-seg/ebhi-seg.zip")


@dataclass
class Ebhi:
    """Images (N, 224, 224, 3) uint8, labels (N, 224, 224) uint8 (class per pixel), case ids and categories."""

    images: np.ndarray
    labels: np.ndarray
    cases: list[str]
    categories: list[str]

    def subset(self, idx: np.ndarray) -> Ebhi:
        return Ebhi(self.images[idx], self.labels[idx], [self.cases[i] for i in idx], [self.categories[i] for i in idx])


def case_of(name: str) -> str:
    """``GT2012358`` of ``GT2012358-2-400-001.jpg`` (the case; an image without one is its own case)."""
    m = re.match(r"(GT[A-Za-z]*\d+)-", name)
    return m.group(1).upper() if m else name


def read_ebhi(zip_path: Path = ZIP) -> Ebhi:
    """Every image with its mask, sorted by path; a mask that does not decode raises."""
    from PIL import Image

    from zoo.train.pcam import decode_jpegs

    images, labels, cases, cats = [], [], [], []
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".jpg") and "/image/" in n):
            cat = name.split("/")[0]
            mask = np.asarray(Image.open(io.BytesIO(z.read(name.replace("/image/", "/label/")[:-4] + ".png"))))
            images.append(z.read(name))
            labels.append(np.where(mask > 0, GROUP[cat], 0).astype(np.uint8))
            cases.append(case_of(name.split("/")[-1]))
            cats.append(cat)
    return Ebhi(decode_jpegs(images), np.stack(labels), cases, cats)


def case_splits(data: Ebhi, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of train (70% of cases), select (15%) and report (15%), by a seeded hash of the case id."""

    def bucket(case: str) -> float:
        return int(hashlib.sha256(f"{seed}:{case}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    b = np.array([bucket(c) for c in data.cases])
    return {"train": np.flatnonzero(b < 0.7), "select": np.flatnonzero((b >= 0.7) & (b < 0.85)),
            "report": np.flatnonzero(b >= 0.85)}  # fmt: skip


def crypt_diameters_px(data: Ebhi) -> np.ndarray:
    """Equivalent diameters (px) of whole, roundish gland cross-sections in the Benign masks (the pixel size)."""
    from skimage.measure import label, regionprops

    out = []
    for lab in data.labels[np.array([GROUP[c] == 1 for c in data.categories])]:
        for r in regionprops(label(lab > 0)):
            y0, x0, y1, x1 = r.bbox
            if r.area > 500 and r.eccentricity < 0.7 and y0 > 0 and x0 > 0 and y1 < lab.shape[0] and x1 < lab.shape[1]:
                out.append(r.equivalent_diameter_area)
    return np.asarray(out)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dihedral transforms (image and labels together), HED jitter, brightness/contrast."""
    from zoo.train.pcam_recipe import brightness_contrast
    from zoo.train.seamless import dihedral

    k = int(torch.randint(0, 8, (1,), generator=gen, device=x.device))
    x, y = dihedral(x, k), dihedral(y, k)
    x = stains.hed_jitter(x, gen, scale=0.2, shift=0.03)
    return brightness_contrast(x, gen), y


def dice_figures(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-class Dice pooled over the images, and the "everything epithelial is Neoplasia" baseline's."""
    out: dict[str, Any] = {}
    for c, name in enumerate(CLASSES):
        a, b = pred == c, truth == c
        s = int(a.sum()) + int(b.sum())
        out[name] = round(2 * int((a & b).sum()) / s, 4) if s else None
    every = np.where(truth > 0, 2, 0)
    a, b = every == 2, truth == 2
    out["neoplasia_baseline_all_epithelium"] = round(2 * int((a & b).sum()) / max(1, int(a.sum() + b.sum())), 4)
    fg_pred, fg_true = pred > 0, truth > 0
    out["epithelium"] = round(2 * int((fg_pred & fg_true).sum()) / max(1, int(fg_pred.sum() + fg_true.sum())), 4)
    return out


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """(N, H, W) argmax labels of uint8 RGB images."""
    from zoo.train.pcam_recipe import _amp

    net.eval()
    amp = _amp(torch.device("cpu"))
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch].transpose(0, 3, 1, 2))).float() / 255.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out.append(net.logits(x).float().argmax(1).numpy().astype(np.uint8))  # type: ignore[operator]
    return np.concatenate(out)


def train(out: Path, zip_path: Path, steps: int, batch: int, lr: float, seed: int, eval_every: int = 200,
          limit: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Train on the ``train`` cases, keep the step with the best mean foreground Dice on ``select``, report on
    ``report``; ``out/colon.pt`` and ``out/train.json``. ``limit`` keeps that many images per split (tests)."""
    import copy

    from zoo.train.common import count_parameters, save_state
    from zoo.train.pcam_recipe import _amp

    t0 = time.perf_counter()
    data = read_ebhi(zip_path)
    idx = case_splits(data, seed)
    if limit:  # evenly spaced, so every category stays
        idx = {k: v[np.linspace(0, len(v) - 1, min(limit, len(v))).astype(int)] for k, v in idx.items()}
    tr = data.subset(idx["train"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = CDUNet(classes=len(CLASSES), base=16, colour_deconvolution=False)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x_all = torch.from_numpy(np.ascontiguousarray(tr.images.transpose(0, 3, 1, 2)))
    y_all = torch.from_numpy(tr.labels.astype(np.int64))
    groups = np.array([GROUP[c] for c in tr.categories])
    pools = [torch.from_numpy(np.flatnonzero(groups == g)) for g in (1, 2)]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    amp = _amp(torch.device("cpu"))
    history, running = [], 0.0
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, 0, copy.deepcopy(net.state_dict()))
    sel = data.subset(idx["select"])
    for step in range(1, steps + 1):
        net.train()
        half = batch // 2
        pick = torch.cat([p[torch.randint(0, len(p), (k,), generator=gen)] for p, k in zip(pools, (half, batch - half),
                                                                                          strict=True)])  # fmt: skip
        x, y = _augment(x_all[pick].float() / 255.0, y_all[pick], gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = net.logits(x.contiguous(memory_format=torch.channels_last)).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % eval_every == 0 or step == steps:
            d = dice_figures(predict(net, sel.images), sel.labels)
            score = float(np.mean([d["Benign"] or 0.0, d["Neoplasia"] or 0.0]))
            n = eval_every if step % eval_every == 0 else step % eval_every
            row = {"step": step, "loss": round(running / n, 4), "select_mean_dice": round(score, 4),
                   "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            running = 0.0
            history.append(row)
            print(json.dumps(row), flush=True)
            if score > best[0]:
                best = (score, step, copy.deepcopy(net.state_dict()))
    net.load_state_dict(best[2])
    out.mkdir(parents=True, exist_ok=True)
    save_state(net, out / "colon.pt")
    rep = data.subset(idx["report"])
    summary: dict[str, Any] = {
        "parameters": count_parameters(net), "torch": torch.__version__, "seed": seed, "steps": steps,
        "batch": batch, "lr": lr, "bf16_autocast": amp, "best_step": best[1], "history": history,
        "splits": {k: {"images": len(v), "cases": len({data.cases[i] for i in v})} for k, v in idx.items()},
        "evaluation": {k: dice_figures(predict(net, v.images), v.labels)
                       for k, v in (("select", sel), ("report", rep))},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def pad_to_tile(images: np.ndarray, tile_px: int) -> tuple[np.ndarray, int]:
    """(N, H, H, 3) images reflect-padded to ``tile_px`` square, and the offset (px) of the original in them."""
    lo = (tile_px - images.shape[1]) // 2
    hi = tile_px - images.shape[1] - lo
    return np.pad(images, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode="reflect"), lo


def export(state_dir: Path, out_dir: Path, tile_px: int = 256, zip_path: Path | None = None) -> dict[str, float]:
    """``colon-neoplasia.onnx`` (softmax over the 3 classes, ``tile_px`` tiles) from ``colon.pt``; with
    ``zip_path``, also the bundled test: the first Normal and the first Adenocarcinoma image of the ``report``
    split (reflect-padded to ``tile_px``) and the torch network's output on them."""
    from zoo.train.export import bundle_test, export_onnx

    net = CDUNet(classes=len(CLASSES), base=16, colour_deconvolution=False)
    net.load_state_dict(torch.load(state_dir / "colon.pt", map_location="cpu"))
    path = out_dir / "colon-neoplasia.onnx"
    res = {"colon-neoplasia": export_onnx(net.eval(), (3, tile_px, tile_px), path, "image", "probabilities")}
    if zip_path is not None:
        data = read_ebhi(zip_path)
        rep = case_splits(data)["report"]
        pick = [next(i for i in rep if data.categories[i] == c) for c in ("Normal", "Adenocarcinoma")]
        x, _ = pad_to_tile(data.images[pick], tile_px)
        image = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        res["bundled_test_max_abs_diff_onnx_vs_torch"] = bundle_test(net, path, {"image": image})
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.colon", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on EBHI-Seg's train cases")
    t.add_argument("--zip", type=Path, default=ZIP, help="EBHI-Seg zip")
    t.add_argument("--out", type=Path, required=True, help="folder for colon.pt and train.json")
    t.add_argument("--steps", type=int, default=2000, help="AdamW steps (one-cycle)")
    t.add_argument("--batch", type=int, default=16, help="images per step (half benign, half neoplastic)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--seed", type=int, default=0, help="random seed (also the case split's)")
    e = sub.add_parser("export", help="export colon-neoplasia.onnx")
    e.add_argument("--state", type=Path, required=True, help="folder with colon.pt")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--test-from", type=Path, default=None, help="EBHI-Seg zip: also write the bundled test from it")
    m = sub.add_parser("mpp", help="the crypt diameters that give the images' um/px")
    m.add_argument("--zip", type=Path, default=ZIP, help="EBHI-Seg zip")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        s = train(a.out, a.zip, a.steps, a.batch, a.lr, a.seed)
        print(json.dumps(s["evaluation"]))
    elif a.cmd == "export":
        print(json.dumps(export(a.state, a.out, zip_path=a.test_from)))
    else:
        d = crypt_diameters_px(read_ebhi(a.zip))
        print(json.dumps({"crypts": len(d), "diameter_px_25_50_75": np.percentile(d, [25, 50, 75]).round(1).tolist()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

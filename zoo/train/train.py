"""Train, evaluate and export ``tissue-multires`` (``python -m zoo.train.train --help``).

BCE loss with Adam as in the paper, soft Dice tracked; seeded; CPU or CUDA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bridge.edits import dice
from zoo.train.data import PatchSampler, Sample, build_datasets
from zoo.train.model import MultiResUNet, ProbabilityModel, count_parameters


def soft_dice(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> float:
    inter = (prob * target).sum()
    return float((2 * inter + eps) / (prob.sum() + target.sum() + eps))


def tiled_predict(net: torch.nn.Module, img: np.ndarray, patch_px: int = 256, overlap: float = 0.2) -> np.ndarray:
    """Tissue probability of a whole (H, W, 3) uint8 image with overlap averaging (as the runner)."""
    h, w = img.shape[:2]
    stride = max(1, round(patch_px * (1 - overlap)))
    ph, pw = max(h, patch_px), max(w, patch_px)
    pad = np.full((ph, pw, 3), 255, np.uint8)
    pad[:h, :w] = img
    acc = np.zeros((ph, pw), np.float32)
    cnt = np.zeros((ph, pw), np.float32)
    ys = list(range(0, ph - patch_px + 1, stride)) or [0]
    xs = list(range(0, pw - patch_px + 1, stride)) or [0]
    if ys[-1] + patch_px < ph:
        ys.append(ph - patch_px)
    if xs[-1] + patch_px < pw:
        xs.append(pw - patch_px)
    net.eval()
    with torch.no_grad():
        for y in ys:
            batch = np.stack([pad[y : y + patch_px, x : x + patch_px] for x in xs]).astype(np.float32) / 255.0
            out = torch.sigmoid(net(torch.from_numpy(batch.transpose(0, 3, 1, 2)))).numpy()[:, 0]
            for x, o in zip(xs, out):
                acc[y : y + patch_px, x : x + patch_px] += o
                cnt[y : y + patch_px, x : x + patch_px] += 1
    return (acc / np.maximum(cnt, 1))[:h, :w]


def evaluate(net: torch.nn.Module, samples: list[Sample]) -> dict[str, float]:
    """Dice at threshold 0.5 of whole-image predictions, per sample."""
    return {s.name: round(dice(tiled_predict(net, s.image) >= 0.5, s.label), 4) for s in samples}


def train(
    data_dir: Path,
    out_dir: Path,
    in_mode: str = "grey",
    norm_single_channel: bool = False,
    steps: int = 600,
    batch: int = 16,
    patch_px: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train one model and write ``model.pt`` and ``train.json`` to ``out_dir``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_s, val_s = build_datasets(data_dir, seed)
    sampler = PatchSampler(train_s, patch_px, seed)
    net = MultiResUNet(in_mode, norm_single_channel).to(device)  # type: ignore[arg-type]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = []
    t0 = time.time()
    for step in range(1, steps + 1):
        net.train()
        x, y = sampler.batch(batch)
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        logits = net(xt)
        loss = F.binary_cross_entropy_with_logits(logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            sd = soft_dice(torch.sigmoid(logits).detach(), yt)
            history.append(
                {
                    "step": step,
                    "bce": round(float(loss.detach()), 4),
                    "soft_dice": round(sd, 4),
                    "s": round(time.time() - t0, 1),
                }
            )
            print(json.dumps(history[-1]), flush=True)
    net = net.cpu()
    val = evaluate(net, val_s)
    summary = {
        "in_mode": in_mode,
        "norm_single_channel": norm_single_channel,
        "parameters": count_parameters(net),
        "steps": steps,
        "batch": batch,
        "patch_px": patch_px,
        "lr": lr,
        "seed": seed,
        "device": device,
        "train_seconds": round(time.time() - t0, 1),
        "train_samples": [s.name for s in train_s],
        "validation_dice": val,
        "validation_mean_dice": round(float(np.mean(list(val.values()))), 4),
        "history": history,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out_dir / "model.pt")
    (out_dir / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def export_onnx(
    state_path: Path,
    in_mode: str,
    onnx_path: Path,
    norm_single_channel: bool = False,
    patch_px: int = 256,
    tol: float = 1e-4,
) -> float:
    """Export a trained net (with sigmoid) to ONNX, dynamic batch; return max |torch - ORT|.

    Raises ValueError when ONNX Runtime and torch disagree by more than ``tol``.
    """
    from zoo.train.export import export_onnx as export_model

    net = MultiResUNet(in_mode, norm_single_channel)  # type: ignore[arg-type]
    net.load_state_dict(torch.load(state_path, map_location="cpu"))
    model = ProbabilityModel(net).eval()
    return export_model(model, (3, patch_px, patch_px), onnx_path, "image", "tissue_probability", tol)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m zoo.train.train",
        description="Train tissue-multires from shared/data and export it to ONNX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data folder")
    ap.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    ap.add_argument("--in-mode", choices=["grey", "rgb"], default="grey", help="network input")
    ap.add_argument(
        "--norm-single-channel", action="store_true", help="GroupNorm on 1-channel maps (Table 3 as printed)"
    )
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=16, help="patches per step")
    ap.add_argument("--patch-px", type=int, default=128, help="training patch side in pixels")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--export", type=Path, default=None, help="also export ONNX to this path")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    summary = train(a.data, a.out, a.in_mode, a.norm_single_channel, a.steps, a.batch, a.patch_px, a.lr, a.seed)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("in_mode", "norm_single_channel", "parameters", "validation_mean_dice", "train_seconds")
            }
        )
    )
    if a.export:
        err = export_onnx(a.out / "model.pt", a.in_mode, a.export, a.norm_single_channel)
        print(f"exported {a.export} (max |torch - onnxruntime| = {err:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

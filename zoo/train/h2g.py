"""H2G-Net (seed 004): a MobileNetV2 patch classifier and a refinement U-Net, trained here.

Stage 1 (``patches``): MobileNetV2 (Sandler et al. 2018, width 1.0) with seed 004's simplified
head: global average pooling, dense 100, dropout 0.5, ReLU, batch norm, dense 2, softmax. ImageNet
weights cannot be downloaded here, so it is trained from scratch (Adam 1e-3 with cosine decay, not
the paper's 1e-4 fine-tuning rate), on balanced batches of PatchCamelyon patches with the paper's
augmentation (flips, 90-degree rotations, HSV shift, brightness; :mod:`zoo.train.augment`).

Stage 2 (``refine``): a U-Net on the 1024x1024 low-resolution image concatenated with the
stage-1 tumour heatmap resized to 1024x1024 (4 channels in, 2-class softmax out; Adam 1e-3 as the
paper). No slide-level tumour masks exist here, so it is trained on composite slides
(:mod:`zoo.train.composites`) built from PCam patches that stage 1 never saw, with stage 1's own
predictions as the heatmap. Base width 16 (1.9 M parameters, against the paper's 11.58 M U-Net)
keeps the file small and CPU refinement under a second.

``python -m zoo.train.h2g train --pack PACK --out DIR`` trains both (GPU when present);
``export`` writes the two ONNX files (probabilities out, dynamic batch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.train import augment, composites
from zoo.train.common import LossLog, count_parameters, device, device_name, double_conv, save_state, to_tensor
from zoo.train.pcam import load_pack

REFINE_PX = 1024


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_cbr(cin, hidden, 1)]
        layers += [_cbr(hidden, hidden, 3, stride, groups=hidden), _cbr(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# (expansion t, channels c, repeats n, first stride s), Sandler et al. Table 2
_MOBILENET_V2 = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class PatchClassifier(nn.Module):
    """MobileNetV2 backbone with seed 004's head; (N, 3, H, W) RGB in [0, 1] -> (N, 2) probabilities."""

    def __init__(self, classes: int = 2, hidden: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(1280, hidden),
            nn.Dropout(0.5),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, classes),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class RefinementUNet(nn.Module):
    """U-Net (Ronneberger et al.): 4 poolings, bilinear upsampling, batch norm.

    (N, 4, H, W): RGB in [0, 1] and the stage-1 tumour heatmap in [0, 1] -> (N, 2, H, W) probabilities.
    """

    def __init__(self, cin: int = 4, classes: int = 2, base: int = 16) -> None:
        super().__init__()
        w = [base * 2**i for i in range(5)]
        self.down = nn.ModuleList([double_conv(cin, w[0])] + [double_conv(w[i], w[i + 1]) for i in range(4)])
        self.up = nn.ModuleList([double_conv(w[i + 1] + w[i], w[i]) for i in reversed(range(4))])
        self.out = nn.Conv2d(w[0], classes, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def train_classifier(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    colour_aug: bool = True,
    cosine: bool = True,
    log_every: int = 200,
) -> list[dict[str, float]]:
    """Balanced batches (half per class, drawn with replacement), augmentation, Adam; returns a loss log.

    ``images`` (N, 3, 96, 96) uint8 on the training device; ``net.logits`` gives the logits.
    """
    dev = images.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    pools = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    net.train()
    log = LossLog(steps, log_every)
    amp = dev.type == "cuda"
    for step in range(1, steps + 1):
        half = batch // 2
        idx = torch.cat(
            [
                p[torch.randint(0, len(p), (n,), generator=gen, device=dev)]
                for p, n in zip(pools, (half, batch - half), strict=True)
            ]
        )
        x = images[idx].float() / 255.0
        x = augment.geometric(x, gen)
        if colour_aug:
            x = augment.colour(x, gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net.logits(x).float(), labels[idx])  # type: ignore[operator]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        log.add(step, loss.item())
    net.eval()
    return log.entries


@torch.no_grad()
def predict_tumour(net: nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Tumour probability per patch, (N,) float, eval mode."""
    net.eval()
    out = [net(images[i : i + batch].float() / 255.0)[:, 1] for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, device=images.device)


class CompositeSource:
    """Random composites (image + stage-1 heatmap in, cell mask out) from pools on one device."""

    def __init__(
        self,
        tumour: torch.Tensor,
        normal: torch.Tensor,
        glass: torch.Tensor,
        tumour_prob: torch.Tensor,
        normal_prob: torch.Tensor,
        out_px: int = REFINE_PX,
        grid: tuple[int, int] = (24, 64),
    ) -> None:
        self.tumour, self.normal, self.glass = tumour, normal, glass
        self.tumour_prob, self.normal_prob = tumour_prob, normal_prob
        self.out_px, self.grid = out_px, grid

    def sample(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(4, S, S) input, (S, S) int64 target, (S, S) stage-1 heatmap."""
        dev = self.tumour.device
        g = int(torch.randint(self.grid[0], self.grid[1] + 1, (1,), generator=gen, device=dev))
        comp = composites.layout(g, len(self.tumour), len(self.normal), len(self.glass), gen, dev)
        img = composites.render(comp, self.tumour, self.normal, self.glass, self.out_px)
        heat = composites.cell_map(composites.heat_of(comp, self.tumour_prob, self.normal_prob), self.out_px)
        target = composites.cell_map((comp.cells == 1).long(), self.out_px, mode="nearest").long()
        return torch.cat([img, heat[None]], 0), target, heat


def train_refinement(
    net: RefinementUNet, source: CompositeSource, steps: int, batch: int, lr: float, seed: int, log_every: int = 100
) -> list[dict[str, float]]:
    """Adam on cross-entropy + soft Dice of the tumour class; flips/rotations and colour jitter of the image."""
    dev = source.tumour.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    amp = dev.type == "cuda"
    log = LossLog(steps, log_every)
    for step in range(1, steps + 1):
        xs, ts = zip(*[source.sample(gen)[:2] for _ in range(batch)], strict=True)
        x, t = torch.stack(xs), torch.stack(ts)
        both = augment.geometric(torch.cat([x, t[:, None].float()], 1), gen)
        x, t = both[:, :4], both[:, 4].round().long()
        x = torch.cat([augment.colour(x[:, :3], gen), x[:, 3:]], 1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net.logits(x).float()
        p = torch.softmax(logits, 1)[:, 1]
        tf = (t == 1).float()
        dice = (2 * (p * tf).sum() + 1) / (p.sum() + tf.sum() + 1)
        loss = F.cross_entropy(logits, t) + (1 - dice)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, loss.item())
    net.eval()
    return log.entries


def train(
    pack: Path, out: Path, steps1: int, steps2: int, batch1: int, batch2: int, seed: int, refine_px: int = REFINE_PX
) -> dict[str, object]:
    """Train both stages from a pack (keys ``stage1``, ``stage2``, ``glass``); save state dicts and train.json.

    ``refine_px``: side of the stage-2 composites (1024 as the paper; smaller only to test the code).
    """
    dev = device()
    t0 = time.perf_counter()
    s1, s2, gl = load_pack(pack, "stage1"), load_pack(pack, "stage2"), load_pack(pack, "glass")
    x1 = to_tensor(s1.decode(), dev)
    y1 = torch.from_numpy(s1.labels).to(dev)
    clf = PatchClassifier().to(dev)
    log1 = train_classifier(clf, x1, y1, steps1, batch1, 1e-3, seed)
    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_state(clf, out / "patches.pt")
    x2 = to_tensor(s2.decode(), dev)
    y2 = torch.from_numpy(s2.labels).to(dev)
    g = to_tensor(gl.decode(), dev)
    prob2 = predict_tumour(clf, x2)
    source = CompositeSource(x2[y2 == 1], x2[y2 == 0], g, prob2[y2 == 1], prob2[y2 == 0], out_px=refine_px)
    unet = RefinementUNet().to(dev)
    log2 = train_refinement(unet, source, steps2, batch2, 1e-3, seed + 1)
    t2 = time.perf_counter()
    save_state(unet, out / "refine.pt")
    acc2 = float(((prob2 >= 0.5).long() == y2).float().mean())
    summary: dict[str, object] = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "seed": seed,
        "stage1": {
            "parameters": count_parameters(clf),
            "patches": {"tumour": int((y1 == 1).sum()), "non_tumour": int((y1 == 0).sum())},
            "steps": steps1, "batch": batch1, "optimiser": "Adam 1e-3, cosine decay", "seconds": round(t1 - t0, 1),
            "loss_log": log1,
            "accuracy_on_stage2_patches": round(acc2, 4),
        },
        "stage2": {
            "parameters": count_parameters(unet),
            "patches": {"tumour": int((y2 == 1).sum()), "non_tumour": int((y2 == 0).sum()), "glass": len(g)},
            "steps": steps2, "batch": batch2, "optimiser": "Adam 1e-3", "seconds": round(t2 - t1, 1),
            "loss_log": log2,
        },
    }  # fmt: skip
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


class RefineTwoInputs(nn.Module):
    """The refinement U-Net with H2G-Net's two inputs, as FAST feeds them: ``image`` (N, 3, H, W) and
    ``heatmap`` (N, 1, H, W), both already multiplied by FAST's scale-factor 1/255 (so the heatmap,
    a 0-1 probability, arrives divided by 255 and is multiplied back here)."""

    def __init__(self, unet: RefinementUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, image: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([image, heatmap * 255.0], 1))


def export(state_dir: Path, out_dir: Path, tol: float = 1e-4) -> dict[str, float]:
    """Export ``patches.onnx`` and ``refine.onnx`` (dynamic batch, probabilities out); return max |torch - ORT|."""
    from zoo.train.export import export_onnx

    clf, unet = PatchClassifier(), RefinementUNet()
    clf.load_state_dict(torch.load(state_dir / "patches.pt", map_location="cpu"))
    unet.load_state_dict(torch.load(state_dir / "refine.pt", map_location="cpu"))
    return {
        "patches": export_onnx(clf.eval(), (3, 96, 96), out_dir / "patches.onnx", "image", "probabilities", tol),
        "refine": export_onnx(
            RefineTwoInputs(unet).eval(), [(3, REFINE_PX, REFINE_PX), (1, REFINE_PX, REFINE_PX)],
            out_dir / "refine.onnx", ["image", "heatmap"], "probabilities", tol,
        ),
    }  # fmt: skip


def export_patches(
    state_dir: Path, out_dir: Path, temperature: float = 1.0, tta: bool | str = False
) -> dict[str, float]:
    """``patches.onnx`` (the softmax at ``temperature``, averaged over the ``tta`` views of
    :data:`zoo.train.pcam_recipe.VIEWS`, inside the graph) from ``patches.pt``."""
    from zoo.train.export import export_onnx
    from zoo.train.pcam_recipe import DihedralTTA

    net = PatchClassifier()
    net.load_state_dict(torch.load(state_dir / "patches.pt", map_location="cpu"))
    with_views = tta not in (False, "none")
    model: nn.Module = DihedralTTA(net, temperature, tta=tta) if temperature != 1.0 or with_views else net
    return {"patches": export_onnx(model.eval(), (3, 96, 96), out_dir / "patches.onnx", "image", "probabilities")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.h2g", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train both stages from a pack (see zoo.train.tumour_data)")
    t.add_argument("--pack", type=Path, required=True, help="pack .npz with stage1, stage2 and glass sets")
    t.add_argument("--out", type=Path, required=True, help="folder for patches.pt, refine.pt, train.json")
    t.add_argument("--steps1", type=int, default=3000, help="stage-1 optimiser steps")
    t.add_argument("--steps2", type=int, default=1500, help="stage-2 optimiser steps")
    t.add_argument("--batch1", type=int, default=128, help="stage-1 batch (balanced)")
    t.add_argument("--batch2", type=int, default=4, help="stage-2 batch of 1024x1024 composites")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    f = sub.add_parser("train-patches-full", help="1.1: the patch stage on all 23,000 PCam patches, full recipe")
    f.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    f.add_argument("--out", type=Path, required=True, help="folder for patches.pt and train.json")
    f.add_argument("--epochs", type=int, default=12, help="epochs of the one-cycle schedule")
    f.add_argument("--batch", type=int, default=128, help="balanced batch")
    f.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.add_argument("--patience", type=int, default=None, help="stop this many epochs after the best (default: never)")
    x = sub.add_parser("export-patches", help="export patches.onnx from patches.pt (calibrated softmax)")
    x.add_argument("--state", type=Path, required=True, help="folder with patches.pt")
    x.add_argument("--out", type=Path, required=True, help="folder for patches.onnx")
    x.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (train.json)")
    x.add_argument(
        "--tta", nargs="?", const="dihedral", default="none", choices=["none", "rotations", "dihedral"],
        help="average these dihedral views inside the graph (train.json's chosen_views); --tta alone: all 8",
    )  # fmt: skip
    v = sub.add_parser("evaluate", help="re-run the evaluation of a trained patches.pt into its train.json")
    v.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    v.add_argument("--state", type=Path, required=True, help="folder with patches.pt and train.json")
    e = sub.add_parser("export", help="export the two ONNX files")
    e.add_argument("--state", type=Path, required=True, help="folder with patches.pt and refine.pt")
    e.add_argument("--out", type=Path, required=True, help="folder for patches.onnx and refine.onnx")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        s = train(a.pack, a.out, a.steps1, a.steps2, a.batch1, a.batch2, a.seed)
        print(json.dumps({k: s[k] for k in ("device", "seed")}))
    elif a.cmd == "train-patches-full":
        from zoo.train.pcam_recipe import train_full

        s = train_full(
            PatchClassifier(), a.zip, a.out, "patches.pt", a.epochs, a.batch, a.lr, a.seed, patience=a.patience
        )
        print(json.dumps({k: s[k] for k in ("device", "parameters", "seconds")}))
    elif a.cmd == "evaluate":
        from zoo.train.pcam_recipe import reevaluate

        clf = PatchClassifier()
        clf.load_state_dict(torch.load(a.state / "patches.pt", map_location="cpu"))
        print(json.dumps(reevaluate(clf, a.zip, a.state)["chosen_views"]))
    elif a.cmd == "export-patches":
        print(json.dumps(export_patches(a.state, a.out, a.temperature, a.tta)))
    else:
        print(json.dumps(export(a.state, a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

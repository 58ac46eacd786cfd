"""CD-UNET (seed 003): a learned colour deconvolution ahead of a U-Net; and the plain U-Net baseline.

Colour-deconvolution segment: two 1x1 convolutions (6 then 3 filters), each followed by batch norm
and ReLU (seed 003 Fig. 3). U-Net: 3x3 convolutions with zero padding and batch norm after every
convolution, 4 poolings, transposed-convolution upsampling, softmax over the classes. Seed 003 uses
a half-width U-Net (32-512 filters, ~7.8 M parameters); here it is a quarter-width U-Net (16-256
filters, 1.96 M parameters) so that the ONNX file stays under 8 MB and the CPU runner stays usable
on 2 cores: the deviation is stated in the card. ``colour_deconvolution=False`` is the plain U-Net
of seed 003's Table 2 comparison.

``python -m zoo.train.cd_unet train --pack PACK --out DIR`` trains both variants (GPU when present).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from zoo.train.h2g import _device, count_parameters
from zoo.train.multiclass import CLASSES, load_sources, train_segmenter


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class UNet(nn.Module):
    """U-Net with batch norm after every convolution; returns decoder features via ``features``."""

    def __init__(self, cin: int = 3, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        w = [base * 2**i for i in range(depth + 1)]
        self.widths = w
        self.down = nn.ModuleList([_double(cin, w[0])] + [_double(w[i], w[i + 1]) for i in range(depth)])
        self.upconv = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, 2) for i in reversed(range(depth))])
        self.up = nn.ModuleList([_double(2 * w[i], w[i]) for i in reversed(range(depth))])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        return skips

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([upconv(x), skip], 1))
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class CDUNet(nn.Module):
    """(N, 3, H, W) RGB in [0, 1] -> (N, classes, H, W) probabilities; H, W multiples of 16."""

    def __init__(self, classes: int = len(CLASSES), base: int = 16, colour_deconvolution: bool = True) -> None:
        super().__init__()
        cd: nn.Module = nn.Identity()
        if colour_deconvolution:
            cd = nn.Sequential(
                nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                nn.Conv2d(6, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
            )  # fmt: skip
        self.cd = cd
        self.unet = UNet(3, base)
        self.head = nn.Conv2d(base, classes, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet.features(self.cd(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def train(pack: Path, out: Path, steps: int, batch: int, seed: int, size: int = 512) -> dict[str, object]:
    dev = _device()
    source = load_sources(pack, dev)
    summary: dict[str, object] = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    out.mkdir(parents=True, exist_ok=True)
    for name, cd in (("cd-unet", True), ("unet", False)):
        net = CDUNet(colour_deconvolution=cd).to(dev)
        s = train_segmenter(net, source, steps, batch, size, seed)
        s["parameters"] = count_parameters(net)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out / f"{name}.pt")
        summary[name] = s
        (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def export(state_dir: Path, out_dir: Path) -> dict[str, float]:
    from zoo.train.export import export_onnx

    net = CDUNet()
    net.load_state_dict(torch.load(state_dir / "cd-unet.pt", map_location="cpu"))
    return {"cd-unet": export_onnx(net.eval(), (3, 512, 512), out_dir / "cd-unet.onnx", "image", "probabilities")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.cd_unet", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train CD-UNET and the plain U-Net from a pack")
    t.add_argument("--pack", type=Path, required=True, help="pack .npz (python -m zoo.train.multiclass_data)")
    t.add_argument("--out", type=Path, required=True, help="folder for cd-unet.pt, unet.pt, train.json")
    t.add_argument("--steps", type=int, default=1500, help="SGD steps per model")
    t.add_argument("--batch", type=int, default=8, help="512 px tiles per step")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    e = sub.add_parser("export", help="export cd-unet.onnx")
    e.add_argument("--state", type=Path, required=True, help="folder with cd-unet.pt")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        s = train(a.pack, a.out, a.steps, a.batch, a.seed)
        print(json.dumps({k: v["seconds"] for k, v in s.items() if isinstance(v, dict)}))
    else:
        print(json.dumps(export(a.state, a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

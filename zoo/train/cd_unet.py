"""CD-UNET (seed 003): a learned colour deconvolution ahead of a U-Net; and the plain U-Net baseline.

Colour-deconvolution segment: two 1x1 convolutions (6 then 3 filters), each followed by batch norm
and ReLU (seed 003 Fig. 3). U-Net: 3x3 convolutions with zero padding and batch norm after every
convolution, 4 poolings, transposed-convolution upsampling, softmax over the classes. As seed 003, the
U-Net is half width (32-512 filters; ``base=32``). ``colour_deconvolution=False`` is the plain U-Net
of seed 003's Table 2 comparison; :mod:`zoo.train.multilevel` uses the quarter-width U-Net (``base=16``).

``python -m zoo.train.cd_unet train --pack PACK --out DIR`` trains both variants (GPU when present).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from zoo.train.common import double_conv
from zoo.train.multiclass import CLASSES, family_main, train_models
from zoo.train.patch_head import PatchHead, compose


class UNet(nn.Module):
    """U-Net with batch norm after every convolution; returns decoder features via ``features``."""

    def __init__(self, cin: int = 3, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        w = [base * 2**i for i in range(depth + 1)]
        self.widths = w
        self.down = nn.ModuleList([double_conv(cin, w[0])] + [double_conv(w[i], w[i + 1]) for i in range(depth)])
        self.upconv = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, 2) for i in reversed(range(depth))])
        self.up = nn.ModuleList([double_conv(2 * w[i], w[i]) for i in reversed(range(depth))])

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

    def __init__(
        self, classes: int = len(CLASSES), base: int = 32, colour_deconvolution: bool = True, patch_head: bool = False
    ) -> None:
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
        # 1.1: the tumour decision of a PCam patch classifier on the encoder (zoo.train.patch_head)
        self.tumour = PatchHead(self.unet.widths[-1]) if patch_head else None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The segmenter's own logits (without the patch head)."""
        return self.head(self.unet.features(self.cd(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tumour is None:
            return torch.softmax(self.logits(x), dim=1)
        skips = self.unet.encode(self.cd(x))
        probs = torch.softmax(self.head(self.unet.decode(skips)), dim=1)
        return compose(probs, self.tumour.dense(skips[-1], tuple(probs.shape[-2:])))  # type: ignore[arg-type]


def train(pack: Path, out: Path, steps: int, batch: int, seed: int, size: int = 512) -> dict[str, object]:
    """CD-UNET and the plain U-Net, same composites and schedule (seed 003 Table 2)."""
    return train_models(
        pack, out, [("cd-unet", CDUNet(), 0), ("unet", CDUNet(colour_deconvolution=False), 0)], steps, batch, size, seed
    )


def export(state_dir: Path, out_dir: Path) -> dict[str, float]:
    from zoo.train.export import export_onnx

    state = torch.load(state_dir / "cd-unet.pt", map_location="cpu")
    net = CDUNet(patch_head=any(k.startswith("tumour.") for k in state))
    net.load_state_dict(state)
    return {"cd-unet": export_onnx(net.eval(), (3, 512, 512), out_dir / "cd-unet.onnx", "image", "probabilities")}


def main(argv: list[str] | None = None) -> int:
    return family_main(
        argv, "zoo.train.cd_unet", __doc__ or "", train, export, "cd-unet", batch=8, tile_px=512, make_net=CDUNet
    )


if __name__ == "__main__":
    raise SystemExit(main())

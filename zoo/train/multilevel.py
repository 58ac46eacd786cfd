"""Multi-level U-Net (seed 002): a high-resolution tile and a centred low-resolution context tile.

Two U-Net branches (the quarter-width U-Net of :mod:`zoo.train.cd_unet`): ``image`` is a 256 px tile
at ~1 um/px, ``context`` a 256 px tile at 4x coarser resolution centred on the same point (so it sees
16x the area). Seed 002's pixel-aligned merge: the context branch's feature maps are cropped to the
region that corresponds to the high-resolution field of view (the central quarter), upsampled to
the high-resolution grid and concatenated, compressed by 1x1 convolutions, (a) into the
high-resolution branch's second-last encoder block and (b) beside its last decoder output before the
softmax head (seed 002 Figs. 9-10). The single-level baseline is the same high-resolution U-Net
without the context branch (``CDUNet(colour_deconvolution=False, base=16)`` trained on the same tiles).

``python -m zoo.train.multilevel train --pack PACK --out DIR`` trains both (GPU when present).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo.train.cd_unet import CDUNet, UNet
from zoo.train.multiclass import CLASSES, family_main, train_models
from zoo.train.patch_head import PatchHead, compose

CONTEXT_FACTOR = 4


def centre_crop_up(feat: torch.Tensor, factor: int, size: tuple[int, ...]) -> torch.Tensor:
    """The central 1/``factor`` of ``feat`` (the high-resolution field of view), bilinearly resized to ``size``."""
    h, w = feat.shape[-2:]
    ch, cw = h // factor, w // factor
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(feat[..., y0 : y0 + ch, x0 : x0 + cw], size=size, mode="bilinear", align_corners=False)


def _compress(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MultiLevelUNet(nn.Module):
    """(image, context): each (N, 3, 256, 256) RGB in [0, 1] -> (N, classes, 256, 256) probabilities."""

    def __init__(
        self, classes: int = len(CLASSES), base: int = 16, factor: int = CONTEXT_FACTOR, patch_head: bool = False
    ) -> None:
        super().__init__()
        self.factor = factor
        self.high, self.context = UNet(3, base), UNet(3, base)
        w = self.high.widths
        self.merge_mid = nn.Sequential(_compress(2 * w[3], w[3]), _compress(w[3], w[3]))
        self.merge_out = nn.Sequential(_compress(2 * w[0], w[0]), _compress(w[0], w[0]))
        self.head = nn.Conv2d(w[0], classes, 1)
        # 1.1: the tumour decision of a PCam patch classifier on the high-resolution encoder (zoo.train.patch_head)
        self.tumour = PatchHead(w[-1]) if patch_head else None

    def _logits_deep(self, image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hs, cs = self.high.encode(image), self.context.encode(context)
        deep = hs[-1]
        mid = centre_crop_up(cs[3], self.factor, tuple(hs[3].shape[-2:]))
        hs[3] = self.merge_mid(torch.cat([hs[3], mid], 1))
        hf = self.high.decode(hs)
        cf = centre_crop_up(self.context.decode(cs), self.factor, tuple(hf.shape[-2:]))
        return self.head(self.merge_out(torch.cat([hf, cf], 1))), deep

    def logits(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The segmenter's own logits (without the patch head)."""
        return self._logits_deep(image, context)[0]

    def forward(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        logits, deep = self._logits_deep(image, context)
        probs = torch.softmax(logits, dim=1)
        if self.tumour is None:
            return probs
        return compose(probs, self.tumour.dense(deep, tuple(probs.shape[-2:])))  # type: ignore[arg-type]


def train(pack: Path, out: Path, steps: int, batch: int, seed: int, size: int = 256) -> dict[str, object]:
    """The multi-level U-Net and its single-level baseline on the same tiles and schedule."""
    models: list[tuple[str, nn.Module, int]] = [
        ("multilevel-unet", MultiLevelUNet(), CONTEXT_FACTOR),
        ("single-level-unet", CDUNet(colour_deconvolution=False, base=16), 0),
    ]
    return train_models(pack, out, models, steps, batch, size, seed)


def export(state_dir: Path, out_dir: Path) -> dict[str, float]:
    from zoo.train.export import export_onnx

    state = torch.load(state_dir / "multilevel-unet.pt", map_location="cpu")
    net = MultiLevelUNet(patch_head=any(k.startswith("tumour.") for k in state))
    net.load_state_dict(state)
    shape = (3, 256, 256)
    return {
        "multilevel-unet": export_onnx(
            net.eval(), [shape, shape], out_dir / "multilevel-unet.onnx", ["image", "context"], "probabilities"
        )
    }


def main(argv: list[str] | None = None) -> int:
    return family_main(
        argv,
        "zoo.train.multilevel",
        __doc__ or "",
        train,
        export,
        "multilevel-unet",
        batch=16,
        tile_px=256,
        make_net=MultiLevelUNet,
        context=CONTEXT_FACTOR,
    )


if __name__ == "__main__":
    raise SystemExit(main())

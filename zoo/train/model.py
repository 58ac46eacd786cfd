"""The multiresolution tissue U-Net of Jurgas et al. (seed 000, Table 3), in torch.

Layer widths follow Table 3 exactly (its parameter counts are reproduced by
:func:`count_parameters`): a 4x4 stride-2 stem conv, three encoder stages of
residual blocks (3x3 conv, GroupNorm, LeakyReLU, 3x3 conv, GroupNorm, 1x1 conv
shortcut) each followed by a 4x4 stride-2 conv, a 16x16 bottleneck, and decoder
stages of residual blocks on the concatenation with the encoder output at the same
scale, each followed by a 4x4 stride-2 transposed conv; 1x1 conv and sigmoid last.

Table 3's first conv has 17 parameters, so the authors feed one grey channel. Here
the network always takes RGB in [0, 1] (N, 3, H, W); ``in_mode="grey"`` prepends a
fixed (not trained) ITU-R 601 luminance 1x1 conv so the exported ONNX model has the
same RGB interface either way.

Deliberate deviation (measured, see the model card): Table 3 puts GroupNorm on the
three single-channel maps (stem, last decoder stage). Over one channel GroupNorm
normalises each patch's whole image, erasing absolute brightness, the cue that
separates an all-glass patch from an all-tissue one. By default those three layers
keep GroupNorm's two affine parameters but do not normalise
(``norm_single_channel=False``); and the LeakyReLU between the last transposed conv
and the 1x1 head is dropped, since with a negative head weight it caps the output at
sigmoid(bias) (measured: all probabilities <= 0.37 after 200 steps). Parameter
counts are unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

LUMA_RGB = (0.299, 0.587, 0.114)


class ChannelAffine(nn.Module):
    """Per-channel scale and bias: GroupNorm's 2C parameters without the normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _gn(channels: int, norm_single_channel: bool = False) -> nn.Module:
    """GroupNorm; on a single channel an affine only, unless ``norm_single_channel`` (Table 3 as printed)."""
    if channels == 1 and not norm_single_channel:
        return ChannelAffine(1)
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """conv3x3-GN-LReLU-conv3x3-GN plus a 1x1 conv shortcut, then LReLU."""

    def __init__(self, c_in: int, c_out: int, norm_single_channel: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            _gn(c_out, norm_single_channel),
            nn.LeakyReLU(0.01),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            _gn(c_out, norm_single_channel),
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 1)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _down(c: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 4, stride=2, padding=1), _gn(c), nn.LeakyReLU(0.01)]


def _up(c: int, act: bool = True, norm_single_channel: bool = False) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
        _gn(c, norm_single_channel),
        nn.LeakyReLU(0.01) if act else nn.Identity(),
    ]


class MultiResUNet(nn.Module):
    """Table 3 U-Net. Input (N, 3, H, W) RGB in [0, 1], H and W multiples of 16; output logits (N, 1, H, W)."""

    luma: torch.Tensor

    def __init__(self, in_mode: Literal["grey", "rgb"] = "grey", norm_single_channel: bool = False) -> None:
        super().__init__()
        self.in_mode = in_mode
        c0 = 1 if in_mode == "grey" else 3
        if in_mode == "grey":
            self.register_buffer("luma", torch.tensor(LUMA_RGB, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(c0, 1, 4, stride=2, padding=1), _gn(1, norm_single_channel), nn.LeakyReLU(0.01)
        )
        self.enc1 = nn.Sequential(ResidualBlock(1, 32), *_down(32))
        self.enc2 = nn.Sequential(ResidualBlock(32, 64), ResidualBlock(64, 64), *_down(64))
        self.enc3 = nn.Sequential(ResidualBlock(64, 128), ResidualBlock(128, 128), *_down(128))
        self.bottleneck = nn.Sequential(ResidualBlock(128, 128), ResidualBlock(128, 128), *_up(128))
        self.dec2 = nn.Sequential(ResidualBlock(128 + 64, 64), *_up(64))
        self.dec1 = nn.Sequential(ResidualBlock(64 + 32, 32), *_up(32))
        self.dec0 = nn.Sequential(
            ResidualBlock(32 + 1, 1, norm_single_channel), *_up(1, act=False, norm_single_channel=norm_single_channel)
        )
        self.head = nn.Conv2d(1, 1, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = (rgb * self.luma).sum(dim=1, keepdim=True) if self.in_mode == "grey" else rgb
        s0 = self.stem(x)  # 1 x H/2
        s1 = self.enc1(s0)  # 32 x H/4
        s2 = self.enc2(s1)  # 64 x H/8
        s3 = self.enc3(s2)  # 128 x H/16
        u = self.bottleneck(s3)  # 128 x H/8
        u = self.dec2(torch.cat([u, s2], 1))  # 64 x H/4
        u = self.dec1(torch.cat([u, s1], 1))  # 32 x H/2
        u = self.dec0(torch.cat([u, s0], 1))  # 1 x H
        return self.head(u)


class ProbabilityModel(nn.Module):
    """Wraps a logits model with a sigmoid, for export (output: tissue probability)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(rgb))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the fixed luminance weights are a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

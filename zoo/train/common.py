"""Pieces the model families' training code shares: device, tensors, checkpoints, loss logs, conv blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from zoo.train.model import count_parameters

__all__ = ["LossLog", "count_parameters", "device", "device_name", "double_conv", "save_state", "to_tensor"]


def device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    """What train.json records as the training device."""
    return torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"


def to_tensor(images: np.ndarray, dev: torch.device) -> torch.Tensor:
    """(N, H, W, C) uint8 images to an (N, C, H, W) uint8 tensor on ``dev``."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dev)


def save_state(net: nn.Module, path: Path) -> None:
    """Save ``net``'s state dict with every tensor on the CPU."""
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, path)


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """U-Net block: two (3x3 conv, zero padding, batch norm, ReLU)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class LossLog:
    """Mean training loss over every ``every`` steps (and the last, possibly shorter, stretch)."""

    def __init__(self, steps: int, every: int, digits: int | None = None) -> None:
        self.steps, self.every, self.digits = steps, every, digits
        self.entries: list[dict[str, float]] = []
        self._running = 0.0

    def add(self, step: int, loss: float) -> None:
        self._running += loss
        if step % self.every == 0 or step == self.steps:
            mean = self._running / (self.every if step % self.every == 0 else step % self.every)
            self.entries.append({"step": step, "loss": mean if self.digits is None else round(mean, self.digits)})
            self._running = 0.0

"""Batch augmentation in torch (runs where the batch is: CPU or GPU).

Seed 004 (H2G-Net) patch classifier: each with probability 0.5, horizontal/vertical flip,
lossless 90-degree rotation, HSV shift of [-20, 20] (on 0-255 scales; hue in degrees), and
multiplicative brightness in [0.8, 1.2]. Seed 001 uses flips only (``flips_only``).
"""

from __future__ import annotations

import torch


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None])[:, 0]
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None])[:, 0]
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None])[:, 0]
    return torch.stack([r, g, b], 1)


def _coin(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < 0.5


def geometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample flips and 90-degree rotations (square (N, C, H, H) batches), each with p = 0.5."""
    n, dev = x.shape[0], x.device
    x = torch.where(_coin(n, gen, dev)[:, None, None, None], x.flip(3), x)
    x = torch.where(_coin(n, gen, dev)[:, None, None, None], x.flip(2), x)
    k = torch.randint(1, 4, (n,), generator=gen, device=dev) * _coin(n, gen, dev)
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out


def colour(x: torch.Tensor, gen: torch.Generator, shift: float = 20.0, brightness: float = 0.2) -> torch.Tensor:
    """Seed 004's HSV shift and brightness, each with p = 0.5, on (N, 3, H, W) RGB in [0, 1]."""
    n, dev = x.shape[0], x.device
    hsv = rgb_to_hsv(x)
    d = (torch.rand(n, 3, generator=gen, device=dev) * 2 - 1) * shift
    d = d / torch.tensor([360.0, 255.0, 255.0], device=dev)
    d = d * _coin(n, gen, dev)[:, None]
    hsv = torch.stack(
        [(hsv[:, 0] + d[:, 0, None, None]) % 1.0, hsv[:, 1] + d[:, 1, None, None], hsv[:, 2] + d[:, 2, None, None]], 1
    )
    x = hsv_to_rgb(hsv.clamp(0, 1))
    f = 1 + (torch.rand(n, generator=gen, device=dev) * 2 - 1) * brightness
    f = torch.where(_coin(n, gen, dev), f, torch.ones_like(f))
    return (x * f[:, None, None, None]).clamp(0, 1)

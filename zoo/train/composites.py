"""Composite slides from real labelled patches, with exact masks (torch; CPU or GPU).

No slide-level tumour masks exist here, so slide-like images are assembled from real material:
a ``grid`` x ``grid`` mosaic of 96 px PatchCamelyon patches (~0.97 um/px). A smooth random blob
decides which cells hold tissue; a second, coarser blob inside the tissue decides which tissue
cells hold tumour patches (label 1) and which non-tumour patches (label 0); cells outside the
tissue hold real glass cut from ``shared/data/slides``. The mask is exact at the cell level: a
cell is tumour when a patch labelled tumour was placed there (PCam's label means tumour in the
patch's central 32x32 px, so a few tumour-cell borders hold non-tumour tissue). Tumour regions
span several cells, so context helps, as on real slides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GLASS = -1  # cell code for glass


@dataclass
class Composite:
    """One composite: ``cells`` (grid, grid) int64 with 1 tumour, 0 other tissue, -1 glass,
    ``index`` (grid, grid) index into the patch (or glass) pool."""

    cells: torch.Tensor
    index: torch.Tensor


def _blob(grid: int, coverage: float, corr_cells: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Boolean (grid, grid) smooth random blob covering about ``coverage`` of the cells."""
    coarse = max(2, round(grid / corr_cells))
    noise = torch.randn(1, 1, coarse, coarse, generator=gen, device=device)
    field = F.interpolate(noise, size=(grid, grid), mode="bicubic", align_corners=False)[0, 0]
    thr = torch.quantile(field.flatten(), 1.0 - coverage)
    return field > thr


def layout(
    grid: int,
    n_tumour: int,
    n_normal: int,
    n_glass: int,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
    tumour_fraction: tuple[float, float] = (0.0, 0.5),
) -> Composite:
    """Random cell layout: tissue blob, tumour blobs inside it, random patch per cell."""
    dev = torch.device(device)
    u = torch.rand(3, generator=gen, device=dev).tolist()
    tissue = _blob(grid, 0.35 + 0.4 * u[0], grid / 4, gen, dev)
    lo, hi = tumour_fraction
    frac = lo + (hi - lo) * u[1]
    tumour = _blob(grid, max(frac, 1e-3), max(3.0, grid / 6), gen, dev) & tissue if u[2] > 0.1 else tissue & False
    cells = torch.full((grid, grid), GLASS, dtype=torch.int64, device=dev)
    cells[tissue] = 0
    cells[tumour] = 1
    index = torch.empty_like(cells)
    for code, n in ((1, n_tumour), (0, n_normal), (GLASS, n_glass)):
        sel = cells == code
        index[sel] = torch.randint(0, n, (int(sel.sum()),), generator=gen, device=dev)
    return Composite(cells, index)


def render(
    comp: Composite,
    tumour: torch.Tensor,
    normal: torch.Tensor,
    glass: torch.Tensor,
    out_px: int,
) -> torch.Tensor:
    """The composite's image, area-resampled to (3, out_px, out_px) float in [0, 1].

    ``tumour``/``normal``/``glass`` are (N, 3, P, P) uint8 or float pools on the same device.
    """
    grid = comp.cells.shape[0]
    p = tumour.shape[-1]
    canvas = torch.empty(grid * grid, 3, p, p, dtype=torch.float32, device=tumour.device)
    flat_cells, flat_idx = comp.cells.flatten(), comp.index.flatten()
    for code, pool in ((1, tumour), (0, normal), (GLASS, glass)):
        sel = flat_cells == code
        if sel.any():
            canvas[sel] = pool[flat_idx[sel]].float()
    if tumour.dtype == torch.uint8:
        canvas /= 255.0
    big = canvas.view(grid, grid, 3, p, p).permute(2, 0, 3, 1, 4).reshape(1, 3, grid * p, grid * p)
    return F.interpolate(big, size=(out_px, out_px), mode="area")[0]


def cell_map(values: torch.Tensor, out_px: int, mode: str = "bilinear") -> torch.Tensor:
    """(grid, grid) per-cell values resized to (out_px, out_px); ``nearest`` for labels."""
    v = values.float()[None, None]
    if mode == "nearest":
        return F.interpolate(v, size=(out_px, out_px), mode="nearest")[0, 0]
    return F.interpolate(v, size=(out_px, out_px), mode="bilinear", align_corners=False)[0, 0]


def heat_of(comp: Composite, tumour_prob: torch.Tensor, normal_prob: torch.Tensor) -> torch.Tensor:
    """Per-cell stage-1 tumour probability: the patch's own prediction; 0 on glass (not classified)."""
    heat = torch.zeros(comp.cells.shape, dtype=torch.float32, device=comp.cells.device)
    for code, prob in ((1, tumour_prob), (0, normal_prob)):
        sel = comp.cells == code
        heat[sel] = prob[comp.index[sel]].float()
    return heat

"""Seamless composites: large regions of one PatchCamelyon label with no cell grid (issue 25).

The first multi-class models learned the composites, not tissue: their training slides were grids of
96 px PCam cells, each cell one label, on kidney glass, so label changes fell on a visible 96 px grid
and the networks called 62-98% of real tumour-free lymph-node tissue Tumor. Here every region is a
*texture* woven from many real patches of one label:

* each piece is a ``piece_px`` crop around a patch's centre (where PCam's label holds: tumour in the
  central 32x32 px; periphery unknown), in one of its 8 dihedral transforms;
* pieces sit on a jittered lattice ``step_px`` apart, so neighbours overlap, and are cross-faded over
  ``ramp_px`` (a linear weight ramp at each piece's border): no seam is straight or regular;
* regions are smooth random blobs drawn at pixel resolution (tissue on glass, tumour inside tissue;
  a quarter of the canvases have no tumour at all), joined with a 2 px soft edge.

Labels are exact by construction: 0 glass, 1 tissue (PCam non-tumour), 2 tumour (PCam tumour), 3
Exclude (artefact strokes, pasted by the caller); a band of ``ignore_px`` either side of a tumour/tissue
boundary is 255 (ignored in the loss and in scoring), since a PCam label says nothing about a patch's rim.

Each texture records which patch each piece came from and where, so a trained model's errors can be traced
back to the patches that caused them (hard-negative mining, :func:`piece_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = 255
GLASS, TISSUE, TUMOUR, EXCLUDE = 0, 1, 2, 3


@dataclass
class Texture:
    """A woven texture: ``image`` (3, S, S) float in [0, 1]; ``pieces`` (K, 3) int64 rows of
    (pool index, y, x) of each piece's top-left corner (may be negative: pieces overhang the border)."""

    image: torch.Tensor
    pieces: torch.Tensor


def _ramp(piece_px: int, ramp_px: int, device: torch.device) -> torch.Tensor:
    """(piece_px, piece_px) weights: 1 inside, falling linearly to ~0 over ``ramp_px`` at every border."""
    r = torch.arange(piece_px, device=device, dtype=torch.float32)
    edge = torch.minimum(r + 0.5, piece_px - r - 0.5) / max(ramp_px, 1)
    w = edge.clamp(0.02, 1.0)
    return w[:, None] * w[None, :]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` (0-7) of the dihedral group on the last two axes (4 rotations x mirror)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def colour_features(pool: torch.Tensor) -> torch.Tensor:
    """(N, 8) standardised appearance per patch: mean and standard deviation of the optical density of each
    RGB channel, the fraction of near-white pixels (fat, lumen) and of dark ones (nuclei). Patches close in
    this space look alike: the same stain and the same kind of tissue."""
    x = pool.float()
    od = -torch.log((x + 1.0) / 256.0)
    grey = x.mean(1)
    f = torch.cat([od.mean(dim=(2, 3)), od.std(dim=(2, 3)), (grey > 215).float().mean(dim=(1, 2))[:, None],
                   (grey < 110).float().mean(dim=(1, 2))[:, None]], 1)  # fmt: skip
    return (f - f.mean(0)) / f.std(0).clamp_min(1e-6)


def neighbourhood(features: torch.Tensor, gen: torch.Generator, k: int) -> torch.Tensor:
    """Indices of the ``k`` patches nearest (in ``features``) to one drawn at random: one region's material,
    so a region looks like one stain of one slide rather than a quilt of many."""
    anchor = int(torch.randint(0, len(features), (1,), generator=gen, device=features.device))
    d = (features - features[anchor]).square().sum(1)
    return torch.topk(d, min(k, len(features)), largest=False).indices


def weave(
    pool: torch.Tensor,
    size_px: int,
    gen: torch.Generator,
    piece_px: int = 80,
    step_px: int = 56,
    jitter_px: int = 6,
    ramp_px: int = 16,
    weights: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    neighbours: int = 64,
) -> Texture:
    """A (3, size_px, size_px) texture from pieces of the (N, 3, P, P) uint8 ``pool``.

    With ``features`` (:func:`colour_features`) the pieces come from the ``neighbours`` patches that look most
    alike around a random one. ``weights`` (N,) makes some patches likelier (hard negatives); default uniform.
    """
    dev = pool.device
    if features is not None:
        near = neighbourhood(features, gen, neighbours)
        sub = weave(pool[near], size_px, gen, piece_px, step_px, jitter_px, ramp_px,
                    None if weights is None else weights[near])  # fmt: skip
        sub.pieces[:, 0] = near[sub.pieces[:, 0]]
        return sub
    n, _, p, _ = pool.shape
    margin = max(0, (p - piece_px) // 2)
    wpiece = _ramp(piece_px, ramp_px, dev)
    origin = -int(torch.randint(0, step_px, (2,), generator=gen, device=dev)[0])
    lattice = torch.arange(origin - step_px, size_px + step_px, step_px, device=dev)  # covers every border
    ys, xs = torch.meshgrid(lattice, lattice, indexing="ij")
    k = ys.numel()
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)
    pos = pos + torch.randint(-jitter_px, jitter_px + 1, (k, 2), generator=gen, device=dev)
    if weights is None:
        idx = torch.randint(0, n, (k,), generator=gen, device=dev)
    else:
        idx = torch.multinomial(weights.float(), k, replacement=True, generator=gen)
    off = torch.randint(-min(margin, 8), min(margin, 8) + 1, (k, 2), generator=gen, device=dev) + margin
    ks = torch.randint(0, 8, (k,), generator=gen, device=dev)
    pad = piece_px + 2 * step_px + jitter_px
    canvas = torch.zeros(3, size_px + 2 * pad, size_px + 2 * pad, device=dev)
    wsum = torch.zeros(size_px + 2 * pad, size_px + 2 * pad, device=dev)
    for j in range(k):
        oy, ox = int(off[j, 0]), int(off[j, 1])
        crop = pool[idx[j], :, oy : oy + piece_px, ox : ox + piece_px].float() / 255.0
        crop = dihedral(crop, int(ks[j]))
        y, x = int(pos[j, 0]) + pad, int(pos[j, 1]) + pad
        canvas[:, y : y + piece_px, x : x + piece_px] += crop * wpiece
        wsum[y : y + piece_px, x : x + piece_px] += wpiece
    img = canvas / wsum.clamp_min(1e-6)
    img = img[:, pad : pad + size_px, pad : pad + size_px].clamp(0, 1)
    return Texture(img, torch.stack([idx, pos[:, 0], pos[:, 1]], 1))


def blob(size_px: int, coverage: float, corr_px: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Boolean (size_px, size_px) random region covering about ``coverage`` of the canvas: smooth noise at a
    correlation length of about ``corr_px``, plus half as much at a quarter of it (irregular borders)."""
    field = torch.zeros(size_px, size_px, device=device)
    for corr, amp in ((corr_px, 1.0), (corr_px / 4, 0.5)):
        coarse = max(2, round(size_px / corr)) + 1
        noise = torch.randn(1, 1, coarse, coarse, generator=gen, device=device)
        field += amp * F.interpolate(noise, size=(size_px, size_px), mode="bicubic", align_corners=False)[0, 0]
    if coverage >= 1.0:
        return torch.ones(size_px, size_px, dtype=torch.bool, device=device)
    thr = torch.quantile(field.flatten()[:: max(1, size_px // 64)], 1.0 - coverage)
    return field > thr


def _soft(mask: torch.Tensor, px: int = 2) -> torch.Tensor:
    """A (1, S, S) float alpha: ``mask`` blurred over about ``px`` pixels."""
    m = mask.float()[None, None]
    k = 2 * px + 1
    return F.avg_pool2d(F.pad(m, (px, px, px, px), mode="replicate"), k, 1)[0]


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """``mask`` grown by ``px`` pixels (square structuring element)."""
    return F.max_pool2d(mask.float()[None, None], 2 * px + 1, 1, px)[0, 0] > 0


@dataclass
class Composite:
    """A seamless composite: ``image`` (3, S, S) float, ``label`` (S, S) uint8 (255 ignored) and the
    textures it was cut from (for :func:`piece_scores`)."""

    image: torch.Tensor
    label: torch.Tensor
    tumour: Texture | None
    normal: Texture


def composite(
    tumour: torch.Tensor,
    normal: torch.Tensor,
    glass: torch.Tensor,
    size_px: int,
    gen: torch.Generator,
    p_tumour_free: float = 0.25,
    tumour_fraction: tuple[float, float] = (0.1, 0.7),
    tissue_fraction: tuple[float, float] = (0.45, 0.95),
    ignore_px: int = 4,
    normal_weights: torch.Tensor | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Composite:
    """One seamless composite of the (N, 3, 96, 96) uint8 pools (tumour and normal PCam patches, glass).

    ``features``: :func:`colour_features` of the tumour and the normal pool (each region stain-consistent).
    """
    dev = normal.device
    u = torch.rand(3, generator=gen, device=dev).tolist()
    lo, hi = tissue_fraction
    tissue = blob(size_px, lo + (hi - lo) * u[0], size_px / 2.0, gen, dev)
    has_tumour = u[2] >= p_tumour_free
    t_lo, t_hi = tumour_fraction
    tum = blob(size_px, t_lo + (t_hi - t_lo) * u[1], size_px / 3.0, gen, dev) & tissue if has_tumour else None
    f_tum, f_norm = features if features is not None else (None, None)
    nt = weave(normal, size_px, gen, weights=normal_weights, features=f_norm)
    gl = weave(glass, size_px, gen, piece_px=80, step_px=60, ramp_px=16)
    a_tissue = _soft(tissue)
    img = gl.image * (1 - a_tissue) + nt.image * a_tissue
    label = torch.full((size_px, size_px), GLASS, dtype=torch.uint8, device=dev)
    label[tissue] = TISSUE
    tt = None
    if tum is not None and tum.any():
        tt = weave(tumour, size_px, gen, features=f_tum)
        a_tum = _soft(tum)
        img = img * (1 - a_tum) + tt.image * a_tum
        label[tum] = TUMOUR
        near_tumour, near_normal = _dilate(tum, ignore_px), _dilate(tissue & ~tum, ignore_px)
        label[near_tumour & near_normal & tissue] = IGNORE
    return Composite(img.clamp(0, 1), label, tt, nt)


def piece_scores(texture: Texture, value: torch.Tensor, pool_size: int, piece_px: int = 64) -> torch.Tensor:
    """(pool_size,) sum over the pieces taken from each patch of ``value`` (S, S) averaged over the piece's
    footprint (clipped to the canvas); patches never used score 0. With ``value`` a model's tumour
    probability on a tumour-free texture, high scores are the patches it wrongly calls tumour."""
    s = value.shape[-1]
    out = torch.zeros(pool_size, device=value.device)
    for idx, y, x in texture.pieces.tolist():
        y0, x0, y1, x1 = max(0, y), max(0, x), min(s, y + piece_px), min(s, x + piece_px)
        if y1 > y0 and x1 > x0:
            out[idx] += value[y0:y1, x0:x1].mean()
    return out

"""Stain augmentation and recolouring by colour deconvolution (Ruifrok & Johnston), in torch.

An RGB image is turned into optical density ``OD = -ln((I + 1) / 256)`` and into stain
concentrations ``C = OD @ inv(M)`` with ``M`` the H&E(+DAB) stain matrix (rows: stain OD vectors);
concentrations are jittered (HED jitter, Tellez et al.) and rendered back with ``M`` or with another
stain matrix (recolouring: haematoxylin and eosin amounts drawn in another pair of stains).
Stain vectors are scikit-image's (``skimage.color.rgb_from_*``), copied here so a GPU machine
without scikit-image can use them.
"""

from __future__ import annotations

import torch

#: rows = OD vectors of (stain 1, stain 2, residual/third stain); from skimage.color
STAIN_MATRICES = {
    "he": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],  # haematoxylin, eosin, DAB
    "h-dab": [[0.65, 0.704, 0.286], [0.268, 0.57, 0.776], [0.383284, -0.427752, 0.181828]],  # IHC
    "h-pas": [[0.644211, 0.716556, 0.266844], [0.175411, 0.972178, 0.154589], [-0.148648, -0.052781, 0.500596]],
    "giemsa": [[0.83475, 0.513556, 0.19633], [0.092789, 0.954111, 0.283111], [-0.041928, -0.21811, 0.748792]],
    "h-aec": [[0.65, 0.704, 0.286], [0.2743, 0.6796, 0.6803], [0.284566, -0.363745, 0.248633]],
}
#: used in training (H&E jitter and recolouring to H-DAB); the others are kept for evaluation
TRAIN_STAINS = ("he", "h-dab")
UNSEEN_STAINS = ("h-pas", "giemsa", "h-aec")


def _matrix(name: str, device: torch.device) -> torch.Tensor:
    m = torch.tensor(STAIN_MATRICES[name], dtype=torch.float32, device=device)
    return m / m.norm(dim=1, keepdim=True)


def concentrations(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) H&E(+DAB) concentrations."""
    od = -torch.log((rgb * 255.0 + 1.0) / 256.0)
    inv = torch.linalg.inv(_matrix("he", rgb.device))
    return torch.einsum("nchw,cd->ndhw", od, inv)


def render(conc: torch.Tensor, stain: str) -> torch.Tensor:
    """Concentrations (N, 3, H, W) drawn with ``stain``'s vectors -> RGB in [0, 1]."""
    od = torch.einsum("nchw,cd->ndhw", conc.clamp_min(0), _matrix(stain, conc.device))
    return ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp(0, 1)


def recolour(rgb: torch.Tensor, stain: str) -> torch.Tensor:
    """H&E image as if stained with ``stain``: haematoxylin -> its first stain, eosin -> its second."""
    c = concentrations(rgb)
    c = torch.stack([c[:, 0], c[:, 1], torch.zeros_like(c[:, 2])], 1)
    return render(c, stain)


def _jitter(c: torch.Tensor, gen: torch.Generator, scale: float, shift: float) -> torch.Tensor:
    n, dev = c.shape[0], c.device
    a = 1 + (torch.rand(n, 3, 1, 1, generator=gen, device=dev) * 2 - 1) * scale
    b = (torch.rand(n, 3, 1, 1, generator=gen, device=dev) * 2 - 1) * shift
    return c * a + b


def hed_jitter(rgb: torch.Tensor, gen: torch.Generator, scale: float = 0.3, shift: float = 0.05) -> torch.Tensor:
    """Per-image random scale (1 +- ``scale``) and shift (+- ``shift``) of each H&E(+DAB) concentration."""
    return render(_jitter(concentrations(rgb), gen, scale, shift), "he")


def train_stain_augment(rgb: torch.Tensor, gen: torch.Generator, p_ihc: float = 0.3) -> torch.Tensor:
    """Strong stain augmentation: HED jitter, or with ``p_ihc`` a jittered recolouring to an H-DAB (IHC) palette."""
    out = hed_jitter(rgb, gen)
    ihc = torch.rand(rgb.shape[0], generator=gen, device=rgb.device) < p_ihc
    if ihc.any():
        c = concentrations(rgb[ihc])
        c = torch.stack([c[:, 0], c[:, 1], torch.zeros_like(c[:, 2])], 1)
        out[ihc] = render(_jitter(c, gen, 0.3, 0.05), "h-dab")
    return out

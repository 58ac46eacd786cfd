"""Classical tissue detection on RGB thumbnails (numpy + scikit-image).

* :func:`otsu_saturation_mask` is the baseline of H2G-Net (seed 004): Otsu's
  threshold on the HSV saturation channel. The runner uses a dilated version of it
  to skip glass before reading tiles at full resolution.
* :func:`reference_labels` is the labeller that made the training labels of
  ``tissue-multires`` (see its model card): saturation *or* darkness, then
  morphological clean-up. Its weaknesses are the model card's known weaknesses.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (H, W, 3) uint8 image: (max - min) / max, 0 on black.

    The S channel of ``skimage.color.rgb2hsv`` (identical values) without computing H
    and V: several times faster, and the runner's pre-mask calls it on every slide.
    """
    mx = rgb.max(axis=-1).astype(np.float64)
    mn = rgb.min(axis=-1).astype(np.float64)
    return np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0).astype(np.float32)


def otsu_saturation_mask(rgb: np.ndarray, min_threshold: float = 0.05) -> np.ndarray:
    """Tissue where HSV saturation exceeds its Otsu threshold (at least ``min_threshold``)."""
    sat = saturation(rgb)
    if float(sat.max()) - float(sat.min()) < 1e-3:
        return np.zeros(sat.shape, dtype=bool)
    return sat > max(float(threshold_otsu(sat)), min_threshold)


def reference_labels(
    rgb: np.ndarray,
    min_object_px: int = 64,
    max_hole_px: int = 256,
    smooth_sigma_px: float = 1.0,
) -> np.ndarray:
    """Heuristic tissue labels for an RGB image at a coarse level (a few µm/px).

    Tissue is saturated (stain) or darker than glass: saturation above a clipped Otsu
    threshold in [0.06, 0.2], or grey level below 0.82 of the glass level (the 95th
    percentile of grey). Then closing, small objects removed and small holes filled;
    sizes are in pixels of ``rgb``.
    """
    rgbf = ndi.gaussian_filter(rgb.astype(np.float32), sigma=(smooth_sigma_px, smooth_sigma_px, 0))
    rgb8 = np.clip(rgbf, 0, 255).astype(np.uint8)
    sat = saturation(rgb8)
    grey = rgbf.mean(axis=-1) / 255.0
    t_sat = float(np.clip(threshold_otsu(sat) if np.ptp(sat) > 1e-3 else 1.0, 0.06, 0.2))
    glass = float(np.percentile(grey, 95))
    mask = (sat > t_sat) | (grey < 0.82 * glass)
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), iterations=1, border_value=0)
    mask = remove_small(mask, min_object_px)
    mask = ~remove_small(~mask, max_hole_px)
    return mask


def remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 8-connected components of ``mask`` smaller than ``min_px`` pixels."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]

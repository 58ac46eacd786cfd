"""A patch-classifier head on a segmenter's encoder: the tumour decision of the multi-class U-Nets (issue 25).

Trained on pixel masks of composites alone, the multi-class U-Nets never learned tumour against normal
lymph node (held-out Tumour Dice 0.002-0.006), or, with the Tumour class weighted up, called half of all
tumour-free tissue Tumor. A PCam label describes a 96 px patch (its centre), not pixels, and the same
encoder trained as a patch classifier on PCam separates the two (select AUC 0.91 after 5 epochs). So the
decision is made where the labels are: a linear layer on the encoder's deepest features (stride 16 px),
averaged over a PCam patch's field.

* training (:meth:`PatchHead.patch_logits`): a 1x1 convolution (2 logits per location) averaged over the
  whole 96 px patch, which is global average pooling followed by a linear layer;
* inference (:meth:`PatchHead.dense`): the same 1x1 convolution averaged over every ``window`` x ``window``
  block of locations (5 x 16 = 80 px, centred on each location; borders average what is inside), the
  tumour-minus-normal logit divided by the temperature and shifted so that the threshold chosen on
  validation maps to 0.5, a sigmoid, and bilinear upsampling to the tile.

The segmenter then says where tissue is, the head which tissue is tumour:
``Tumour = P(tissue) x t``, ``Tissue = P(tissue) x (1 - t)``, where ``P(tissue)`` is the segmenter's Tissue
plus Tumour probability; Background and Exclude are the segmenter's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_STRIDE_PX = 16


class PatchHead(nn.Module):
    """Tumour probability from (N, width, H/16, W/16) features; window, temperature and threshold are buffers (saved
    with the state, folded into the exported graph)."""

    window: torch.Tensor
    temperature: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, width: int, window: int = 5) -> None:
        super().__init__()
        self.fc = nn.Conv2d(width, 2, 1)
        self.register_buffer("window", torch.tensor(window))
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("threshold", torch.full((), 0.5))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        state_dict.setdefault(prefix + "window", torch.tensor(5))  # states saved before the window was a buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def patch_logits(self, deep: torch.Tensor) -> torch.Tensor:
        """(N, 2) logits of whole patches (global average pooling, then the linear layer)."""
        return self.fc(deep).mean(dim=(2, 3))

    def dense(self, deep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, *size) tumour probability, 0.5 at the chosen threshold."""
        logits = self.fc(deep)
        diff = logits[:, 1:2] - logits[:, 0:1]
        k = int(self.window.item())  # a constant of the exported graph
        diff = F.avg_pool2d(diff, k, 1, k // 2, count_include_pad=False)
        t, thr = self.temperature, self.threshold.clamp(1e-4, 1 - 1e-4)
        z = diff / t - torch.log(thr / (1 - thr))
        return F.interpolate(torch.sigmoid(z), size=size, mode="bilinear", align_corners=False)


def compose(probs: torch.Tensor, tumour: torch.Tensor, tissue: int = 1, tumour_class: int = 2) -> torch.Tensor:
    """Four-class probabilities with the segmenter's tissue (``tissue`` + ``tumour_class``) split by ``tumour``."""
    any_tissue = probs[:, tissue : tissue + 1] + probs[:, tumour_class : tumour_class + 1]
    parts = [probs[:, c : c + 1] for c in range(probs.shape[1])]
    parts[tissue], parts[tumour_class] = any_tissue * (1 - tumour), any_tissue * tumour
    return torch.cat(parts, 1)

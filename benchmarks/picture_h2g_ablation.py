"""Draw one held-out composite with its truth, H2G stage 1 alone and stage 1 + refinement.

python benchmarks/picture_h2g_ablation.py      # -> docs/images/h2g-ablation-composite.jpg
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.train import composites  # noqa: E402
from zoo.train.pcam import read_pcam  # noqa: E402
from zoo.train.tumour_data import glass_patches  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> int:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = read_pcam(SHARED / "pcam/pcam-ai4all-trainval.zip", "valid")
    x, y = valid.decode(), valid.labels
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    patches = ort.InferenceSession(str(ROOT / "models/tumour-h2g/1.0.0/patches.onnx"), so)
    refine = ort.InferenceSession(str(ROOT / "models/tumour-h2g/1.0.0/refine.onnx"), so)
    p = np.concatenate(
        [
            patches.run(None, {"image": x[i : i + 256].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0][:, 1]
            for i in range(0, len(x), 256)
        ]
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    tum, nor = y == 1, y == 0
    glass = t(glass_patches(SHARED / "slides/kidney-48-5.tif", 200, 99).transpose(0, 3, 1, 2))
    gen = torch.Generator().manual_seed(7)
    comp = composites.layout(40, int(tum.sum()), int(nor.sum()), 200, gen, "cpu", (0.2, 0.5))
    img = composites.render(comp, t(x[tum].transpose(0, 3, 1, 2)), t(x[nor].transpose(0, 3, 1, 2)), glass, 1024)
    heat = composites.cell_map(composites.heat_of(comp, t(p[tum]), t(p[nor])), 1024).numpy()
    truth = composites.cell_map((comp.cells == 1).long(), 1024, mode="nearest").numpy() > 0.5
    refined = refine.run(None, {"image": img[None].numpy(), "heatmap": heat[None, None] / 255})[0][0, 1]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [
        (img.numpy().transpose(1, 2, 0), "held-out composite (PCam valid patches)"),
        (truth, "truth: tumour cells"),
        (heat >= 0.5, f"stage 1 alone (Dice {dice(heat >= 0.5, truth):.2f})"),
        (refined >= 0.5, f"stage 1 + refinement (Dice {dice(refined >= 0.5, truth):.2f})"),
    ]
    for ax, (im, title) in zip(axes, panels, strict=True):
        ax.imshow(im, cmap="Reds" if im.ndim == 2 else None)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    out = ROOT / "docs/images/h2g-ablation-composite.jpg"
    fig.savefig(out, dpi=80)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

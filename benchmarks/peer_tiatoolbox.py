"""TIAToolbox's SemanticSegmentor running tissue-multires, as a peer for ``bench_runner.py --peers tiatoolbox``.

Runs inside TIAToolbox's own virtual environment (bench_runner.py makes it: TIAToolbox 2.1 needs
torch<2.13 and the matching torchvision), never in the project's:

    TIA_VENV/bin/python benchmarks/peer_tiatoolbox.py SLIDE MPP OUT_DIR [--batch 8]

The network is the registered ONNX file run by :mod:`zoo.engines.torch_graph` (the same weights and arithmetic as
``--engine torch``), wrapped as a TIAToolbox ``ModelABC`` with a 2-channel (background, tissue) output.
TIAToolbox reads the slide itself (its WSIReader), tiles with the registry's patch size and overlap at the
given µm/px, masks glass with its own tissue detector, stitches and writes the probabilities (zarr). The
script prints one JSON line: seconds for ``run`` and the path of the tissue label mask it saved (.npy).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("mpp", type=float)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()

    import yaml
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    from zoo.engines.torch_graph import load_graph

    reg = yaml.safe_load((REPO / "registry.yaml").read_text())
    entry = next(m for m in reg["models"] if m["name"] == "tissue-multires")
    onnx_path = REPO / "models/tissue-multires/1.0.0/tissue-multires.onnx"
    patch = int(entry["input"]["patch_size_px"][0])
    stride = max(1, round(patch * (1 - float(entry["input"]["overlap"]))))
    scale = float(entry["input"].get("scale", 1 / 255))
    if a.threads:
        torch.set_num_threads(a.threads)

    class ZooTissue(ModelABC):
        """The registered ONNX network with a (background, tissue) probability output."""

        def __init__(self) -> None:
            super().__init__()
            self.graph = load_graph(str(onnx_path), str(onnx_path))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.graph(x)[0]
            return torch.cat([1 - p, p], dim=1)

        @staticmethod
        def postproc(image: np.ndarray) -> np.ndarray:
            """Probabilities to labels, as TIAToolbox's own segmentation models do."""
            return np.argmax(image, axis=-1)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *, device: str) -> np.ndarray:
            x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2) * scale
            with torch.inference_mode():
                y = model(x)
            return y.permute(0, 2, 3, 1).cpu().numpy()

    res = [{"units": "mpp", "resolution": a.mpp}]
    io = IOSegmentorConfig(
        input_resolutions=res,
        output_resolutions=res,
        patch_input_shape=(patch, patch),
        patch_output_shape=(patch, patch),
        stride_shape=(stride, stride),
        save_resolution=res[0],
    )
    seg = SemanticSegmentor(model=ZooTissue(), batch_size=a.batch, num_workers=0, device="cpu", verbose=False)
    t = time.perf_counter()
    out = seg.run([a.slide], patch_mode=False, ioconfig=io, save_dir=a.out, overwrite=True, output_type="zarr")
    secs = time.perf_counter() - t
    import zarr

    store = next(iter(out.values())) if isinstance(out, dict) else out
    labels = np.asarray(zarr.open(str(store), mode="r")["predictions"])
    labels = labels[..., 0] if labels.ndim == 3 else labels
    mask_path = a.out / "labels.npy"
    np.save(mask_path, labels.astype(np.uint8))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss carries the parent's over)
        peak = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), peak)
    print(json.dumps({"seconds": secs, "labels": str(mask_path), "peak_rss_mb": peak}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

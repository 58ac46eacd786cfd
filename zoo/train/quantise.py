"""int8 copies of registered networks: post-training static quantisation (QDQ) with ONNX Runtime's tools.

    python -m zoo.train.quantise --model tumour-tiles@1.2.0 --pcam ../shared/data/pcam/pcam-ai4all-trainval.zip \
        --out models/tumour-tiles/1.2.0/tumour-tiles-int8.onnx

The convolutions get int8 weights (per output channel, symmetric) and uint8 activations whose ranges are
the min/max over calibration tiles run through the fp32 network (``--calibration`` seeded PCam *train*
patches: never the valid split the precision is judged on). The network's first convolution, the dense
head and the residual additions stay float: quantising them flipped 2-3x more PCam valid labels for a
5-10% gain (``benchmarks/evaluate_real_tissue.py --parts precisions``). The file runs as int8 on OpenVINO
and ONNX Runtime (VNNI); register it as the entry's ``precisions.int8.weights`` with the printed sha256
and held-out figures. Needs only onnx and onnxruntime (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zoo.registry import ModelEntry, load_registry, sha256_file, verified_weights

#: operators quantised: convolutions only (see the module docstring)
QUANTISED_OPS = ("Conv",)


def first_conv(path: Path) -> str:
    """Name of the first Conv node in graph order (the stem, after any test-time-augmentation views)."""
    import onnx

    for node in onnx.load_model(str(path), load_external_data=False).graph.node:
        if node.op_type == "Conv":
            return str(node.name)
    raise ValueError(f"{path}: no Conv node to quantise")


def quantise(entry: ModelEntry, src: Path, out: Path, tiles: np.ndarray, batch: int = 64) -> dict[str, object]:
    """Write ``src`` quantised to int8 (QDQ) at ``out``, calibrated on ``tiles`` ((N, H, W, 3) uint8, the
    entry's patch size, normalised as the runner does). Returns what was done, for the registry's ``made_by``.

    Raises:
        FileExistsError: ``out`` exists (never overwritten).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from zoo.engines.model import normalise

    if out.exists():
        raise FileExistsError(f"{out}: exists; choose another --out (quantised files are never overwritten)")
    x = normalise(tiles, entry.input)

    class Tiles(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (x[i : i + batch] for i in range(0, len(x), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.batches, None)
            return None if b is None else {entry.input.input_name: b}

    keep_float = [first_conv(src)]
    with tempfile.TemporaryDirectory(prefix="zoo-quantise-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))  # shape inference and graph clean-up, as the quantiser expects
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(
            str(pre), str(out), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=keep_float,
        )  # fmt: skip
    import onnxruntime

    return {
        "model": entry.id,
        "out": str(out),
        "sha256": sha256_file(out),
        "size_bytes": out.stat().st_size,
        "calibration_tiles": len(tiles),
        "quantised_ops": list(QUANTISED_OPS),
        "kept_float": keep_float,
        "onnxruntime": onnxruntime.__version__,
    }


def pcam_calibration(zip_path: Path, n: int, seed: int) -> np.ndarray:
    """``n`` seeded PCam train patches ((n, 96, 96, 3) uint8), half tumour, half not."""
    from zoo.train.pcam import balanced_split, read_pcam

    train = read_pcam(zip_path, "train")
    return train.subset(balanced_split(train.labels, n // 2, seed)).decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m zoo.train.quantise", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--model", required=True, help="registered NAME@VERSION (a 96 px PCam-domain network)")
    ap.add_argument("--stage", default=None, help="cascade stage to quantise (default: the first)")
    ap.add_argument("--pcam", type=Path, required=True, help="PCam zip: calibration from its train split")
    ap.add_argument("--calibration", type=int, default=512, help="calibration patches (balanced)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    ap.add_argument("--out", type=Path, required=True, help="quantised ONNX file (must not exist)")
    a = ap.parse_args(argv)
    reg = load_registry()
    entry = reg.get(a.model)
    views = dict(entry.networks())
    view = views.get(a.stage or entry.stage_name)
    if view is None:
        print(f"--stage {a.stage}: {entry.id} has stages {', '.join(views)}", file=sys.stderr)
        return 2
    if tuple(view.input.patch_size_px) != (96, 96):
        print(f"--model {entry.id}: input {view.input.patch_size_px} px; PCam calibration needs 96 px", file=sys.stderr)
        return 2
    tiles = pcam_calibration(a.pcam, a.calibration, a.seed)
    try:
        info = quantise(view, verified_weights(view, reg), a.out, tiles)
    except FileExistsError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

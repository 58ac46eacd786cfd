"""Seed 001 (entropy rails + lightweight tile CNN), trained here on PatchCamelyon.

Entropy rails: the minimum and maximum grey-level image entropy (bits, :func:`zoo.train.pcam.image_entropy`)
of the training tumour patches; at inference a tile is classified only when its entropy lies on or
between the rails (seed 001: "a candidate tile is retained only if its image entropy lies on or
within the rails").

The CNN follows the paper's description of its model (reference [15]): few convolutional layers and
three dropout layers, softmax, categorical cross-entropy, Adam 1e-4, batch 16, random flips only:
three 3x3 conv + ReLU + 2x2 max-pool stages (32, 64, 128 filters), dense 64, dense 2
(1,271,234 parameters; :func:`count_parameters`).

1.2 replaces that network with :class:`TileResNet`, a lightweight residual CNN (eight 3x3 basic blocks,
batch norm, global average pooling): the seed's three-layer CNN could not fit the 20,000 PCam patches
under the full augmentation (training loss 0.39 at its best, PCam valid AUC 0.92), the residual one
reaches AUC 0.95 with the same recipe.

``python -m zoo.train.tumour_tiles train --pack PACK --out DIR`` trains 1.0 (GPU when present);
``train-full --zip PCAM --out DIR [--net resnet]`` trains 1.1 (1.2) on all 23,000 patches with
:mod:`zoo.train.pcam_recipe`;
``rails --zip PCAM`` prints the rails; ``export`` writes the ONNX file (``--tta``: 1.1's graph, the
softmax at the fitted temperature averaged over the 8 dihedral views).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.train.common import count_parameters, device, device_name, save_state, to_tensor
from zoo.train.h2g import train_classifier
from zoo.train.pcam import image_entropy, load_pack, read_pcam


class TileCNN(nn.Module):
    """(N, 3, 96, 96) RGB in [0, 1] -> (N, 2) probabilities (non-tumour, tumour)."""

    def __init__(self, patch_px: int = 96, classes: int = 2) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *stage(3, 32), *stage(32, 64), nn.Dropout(0.25), *stage(64, 128), nn.Dropout(0.25), nn.Flatten()
        )
        side = patch_px // 8
        self.head = nn.Sequential(
            nn.Linear(128 * side * side, 64), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(64, classes)
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.project: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.project(x))


class TileResNet(nn.Module):
    """(N, 3, 96, 96) RGB in [0, 1] -> (N, 2) probabilities: a stride-2 3x3 stem, four stages of two basic
    blocks (``widths``; each later stage halves the resolution), global average pooling, one linear layer.

    With the default widths: 2,795,554 parameters, 0.31 G multiply-adds per 96 px tile.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


#: the networks of this family by name: 1.0/1.1 ``cnn`` (seed 001's), 1.2 ``resnet``
NETWORKS: dict[str, type[nn.Module]] = {"cnn": TileCNN, "resnet": TileResNet}


def learn_rails(zip_path: Path) -> dict[str, float]:
    """Entropy rails (bits) from every training tumour patch of the PCam zip."""
    train = read_pcam(zip_path, "train")
    tumour = train.subset(np.flatnonzero(train.labels == 1))
    h = image_entropy(tumour.decode())
    return {"min_bits": round(float(h.min()), 4), "max_bits": round(float(h.max()), 4), "tumour_patches": len(h)}


def train(pack: Path, out: Path, steps: int, batch: int, seed: int) -> dict[str, object]:
    dev = device()
    t0 = time.perf_counter()
    s1 = load_pack(pack, "stage1")
    x = to_tensor(s1.decode(), dev)
    y = torch.from_numpy(s1.labels).to(dev)
    net = TileCNN().to(dev)
    log = train_classifier(net, x, y, steps, batch, 1e-4, seed, colour_aug=False, cosine=False, log_every=1000)
    out.mkdir(parents=True, exist_ok=True)
    save_state(net, out / "tiles.pt")
    summary: dict[str, object] = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "seed": seed,
        "parameters": count_parameters(net),
        "patches": {"tumour": int((y == 1).sum()), "non_tumour": int((y == 0).sum())},
        "steps": steps,
        "batch": batch,
        "epochs": round(steps * batch / len(y), 1),
        "optimiser": "Adam 1e-4 (seed 001), flips only",
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_log": log,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_full(
    zip_path: Path,
    out: Path,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    steps_per_epoch: int | None = None,
    limit: int | None = None,
    patience: int | None = None,
    net: str = "cnn",
) -> dict[str, object]:
    """1.1 (``cnn``) / 1.2 (``resnet``): the tile network on every PCam patch with the full recipe
    (:func:`zoo.train.pcam_recipe.train_full`)."""
    from zoo.train import pcam_recipe as rc

    return rc.train_full(
        NETWORKS[net](), zip_path, out, "tiles.pt", epochs, batch, lr, seed, steps_per_epoch, limit, patience
    )


def export(
    state_dir: Path, out_dir: Path, tta: bool | str = False, temperature: float = 1.0, net_name: str = "cnn"
) -> dict[str, float]:
    """``tumour-tiles.onnx`` from ``tiles.pt``: the softmax at ``temperature``, averaged over the ``tta`` views
    (:data:`zoo.train.pcam_recipe.VIEWS`), inside the graph."""
    from zoo.train.export import export_onnx

    net: nn.Module = NETWORKS[net_name]()
    net.load_state_dict(torch.load(state_dir / "tiles.pt", map_location="cpu"))
    if tta not in (False, "none") or temperature != 1.0:  # the calibrated softmax (and the views) inside the graph
        from zoo.train.pcam_recipe import DihedralTTA

        net = DihedralTTA(net, temperature, tta=tta)
    return {"tiles": export_onnx(net.eval(), (3, 96, 96), out_dir / "tumour-tiles.onnx", "image", "probabilities")}


def write_bundled_test(onnx_path: Path, zip_path: Path, out_dir: Path) -> dict[str, object]:
    """``test_input.npy`` (the first 4 tumour and 4 non-tumour PCam valid patches, RGB / 255, NCHW) and
    ``test_expected.npy`` (the exported graph's output for them, ONNX Runtime fp32)."""
    import onnxruntime as ort

    valid = read_pcam(zip_path, "valid")
    order = np.concatenate([np.flatnonzero(valid.labels == 1)[:4], np.flatnonzero(valid.labels == 0)[:4]])
    x = valid.subset(order).decode().transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"image": x})[0]
    np.save(out_dir / "test_input.npy", x)
    np.save(out_dir / "test_expected.npy", y)
    return {"patches": [valid.names[i] for i in order], "tumour_probability": [round(float(v), 4) for v in y[:, 1]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.train.tumour_tiles", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the tile CNN from a pack's stage1 set")
    t.add_argument("--pack", type=Path, required=True, help="pack .npz (zoo.train.tumour_data)")
    t.add_argument("--out", type=Path, required=True, help="folder for tiles.pt and train.json")
    t.add_argument("--steps", type=int, default=12000, help="optimiser steps")
    t.add_argument("--batch", type=int, default=16, help="batch (seed 001: 16)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    f = sub.add_parser("train-full", help="1.1: all 23,000 PCam patches, full augmentation, TTA and calibration")
    f.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    f.add_argument("--out", type=Path, required=True, help="folder for tiles.pt and train.json")
    f.add_argument("--epochs", type=int, default=24, help="epochs of the one-cycle schedule")
    f.add_argument("--patience", type=int, default=None, help="stop this many epochs after the best (default: never)")
    f.add_argument("--batch", type=int, default=128, help="balanced batch")
    f.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.add_argument("--net", choices=sorted(NETWORKS), default="cnn", help="cnn: seed 001's (1.1); resnet: 1.2")
    r = sub.add_parser("rails", help="print the entropy rails of the PCam training tumour patches")
    r.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    e = sub.add_parser("export", help="export tumour-tiles.onnx")
    e.add_argument("--state", type=Path, required=True, help="folder with tiles.pt")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument(
        "--tta", nargs="?", const="dihedral", default="none", choices=["none", "rotations", "dihedral"],
        help="average these dihedral views inside the graph (train.json's chosen_views); --tta alone: all 8",
    )  # fmt: skip
    v = sub.add_parser("evaluate", help="re-run the evaluation of a trained tiles.pt into its train.json")
    v.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    v.add_argument("--state", type=Path, required=True, help="folder with tiles.pt and train.json")
    v.add_argument("--net", choices=sorted(NETWORKS), default="cnn", help="the network tiles.pt holds")
    e.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (train.json, 1.1)")
    e.add_argument("--net", choices=sorted(NETWORKS), default="cnn", help="the network tiles.pt holds")
    e.add_argument(
        "--test-from", type=Path, default=None, help="PCam zip: also write the bundled test from its valid split"
    )
    a = ap.parse_args(argv)
    if a.cmd == "train":
        s = train(a.pack, a.out, a.steps, a.batch, a.seed)
        print(json.dumps({k: s[k] for k in ("device", "parameters", "seconds")}))
    elif a.cmd == "train-full":
        s = train_full(a.zip, a.out, a.epochs, a.batch, a.lr, a.seed, patience=a.patience, net=a.net)
        print(json.dumps({k: s[k] for k in ("device", "parameters", "seconds")}))
    elif a.cmd == "evaluate":
        from zoo.train.pcam_recipe import reevaluate

        net = NETWORKS[a.net]()
        net.load_state_dict(torch.load(a.state / "tiles.pt", map_location="cpu"))
        print(json.dumps(reevaluate(net, a.zip, a.state)["chosen_views"]))
    elif a.cmd == "rails":
        print(json.dumps(learn_rails(a.zip)))
    else:
        res: dict[str, object] = dict(export(a.state, a.out, a.tta, a.temperature, a.net))
        if a.test_from:
            res["bundled_test"] = write_bundled_test(a.out / "tumour-tiles.onnx", a.test_from, a.out)
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

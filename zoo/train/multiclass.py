"""Four-class composite slides and the shared training loop of the multi-class U-Nets (seeds 002, 003).

Classes: 0 Background (glass), 1 Tissue (PCam non-tumour), 2 Tumour (PCam tumour), 3 Exclude (pen
marks and coverslip edges). No expert pixel masks with these papers' classes exist here, so slides
are composites of real labelled material with exact masks: a :func:`zoo.train.composites.layout`
mosaic of 96 px PatchCamelyon patches (~0.97 um/px; tumour blobs span several 256 px tiles, so
context matters), real glass, and "Exclude" strokes cut from the HistoQC pen-mark and coverslip
crops exactly where their artefact masks are set, upscaled 8-20x to slide scale. Seams between
tissue and tumour cells (3 px each side) are ignored in the loss (label 255): a PCam label describes
its patch's centre. Seed 003's Necrosis class has no data here and is left out.

Training (seed 003): softmax cross-entropy with median-frequency class weights (Eigen & Fergus) and
zero weight on ignored pixels, SGD with momentum 0.9; strong stain augmentation
(:mod:`zoo.train.stains`: HED jitter, recolouring to H-DAB) plus flips and 90-degree rotations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.train import composites, stains
from zoo.train.common import LossLog, count_parameters, device, device_name, save_state, to_tensor
from zoo.train.pcam import PATCH_PX, load_pack

CLASSES = ("Background", "Tissue", "Tumour", "Exclude")
IGNORE = 255
ARTEFACTS = (
    "models_pen_markings_he_pen_green",
    "models_pen_markings_he_pen_red",
    "models_coverslip_edge_he_coverslip_edge",
)


def artefact_arrays(images_dir: Path) -> dict[str, np.ndarray]:
    """The HistoQC crops and their masks as arrays for a pack (``<name>_rgb``, ``<name>_mask``)."""
    from PIL import Image

    out = {}
    for n in ARTEFACTS:
        out[f"{n}_rgb"] = np.asarray(Image.open(images_dir / f"{n}.png").convert("RGB"))
        out[f"{n}_mask"] = np.asarray(Image.open(images_dir / f"{n}_mask.png")).astype(bool)
    return out


class CanvasSource:
    """Random four-class composite canvases on one device."""

    def __init__(
        self,
        tumour: torch.Tensor,
        normal: torch.Tensor,
        glass: torch.Tensor,
        artefacts: list[tuple[torch.Tensor, torch.Tensor]],
        grid: tuple[int, int] = (24, 40),
    ) -> None:
        self.tumour, self.normal, self.glass, self.artefacts, self.grid = tumour, normal, glass, artefacts, grid

    def canvas(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) RGB in [0, 1] and (S, S) uint8 labels (255 = ignored), S = grid x 96 px."""
        dev = self.tumour.device
        g = int(torch.randint(self.grid[0], self.grid[1] + 1, (1,), generator=gen, device=dev))
        comp = composites.layout(g, len(self.tumour), len(self.normal), len(self.glass), gen, dev, (0.1, 0.6))
        s = g * PATCH_PX
        img = composites.render(comp, self.tumour, self.normal, self.glass, s)
        code = {composites.GLASS: 0, 0: 1, 1: 2}
        cells = torch.zeros_like(comp.cells, dtype=torch.uint8)
        for k, v in code.items():
            cells[comp.cells == k] = v
        label = composites.cell_map(cells, s, mode="nearest").to(torch.uint8)
        # ignore tissue/tumour seams (3 px each side)
        tissue = (label == 1) | (label == 2)
        lab_f = label.float()[None, None]
        hi = F.max_pool2d(lab_f, 7, 1, 3)[0, 0]
        lo = -F.max_pool2d(-lab_f, 7, 1, 3)[0, 0]
        label[tissue & (hi != lo) & (hi <= 2) & (lo >= 1)] = IGNORE
        n_art = int(torch.randint(0, 3, (1,), generator=gen, device=dev))
        for _ in range(n_art):
            paste_artefact(img, label, self.artefacts, gen)
        return img, label


def paste_artefact(
    img: torch.Tensor, label: torch.Tensor, artefacts: list[tuple[torch.Tensor, torch.Tensor]], gen: torch.Generator
) -> None:
    """Paste one Exclude stroke (a pen mark or coverslip edge cut along its mask, upscaled 8-20x) in place."""
    dev = img.device
    src_rgb, src_mask = artefacts[int(torch.randint(0, len(artefacts), (1,), generator=gen, device=dev))]
    ys, xs = torch.nonzero(src_mask, as_tuple=True)
    k = int(torch.randint(0, len(ys), (1,), generator=gen, device=dev))
    w = int(torch.randint(24, 64, (1,), generator=gen, device=dev))
    h0, w0 = src_mask.shape
    y0 = max(0, min(h0 - w, int(ys[k]) - w // 2))
    x0 = max(0, min(w0 - w, int(xs[k]) - w // 2))
    f = float(torch.empty(1, device=dev).uniform_(8.0, 20.0, generator=gen))
    side = min(int(w * f), img.shape[-1])
    crop = F.interpolate(
        src_rgb[None, :, y0 : y0 + w, x0 : x0 + w].float() / 255.0, size=(side, side), mode="bilinear"
    )[0]
    mask = (
        F.interpolate(src_mask[None, None, y0 : y0 + w, x0 : x0 + w].float(), size=(side, side), mode="nearest")[0, 0]
        > 0.5
    )
    s = img.shape[-1]
    py = int(torch.randint(0, s - side + 1, (1,), generator=gen, device=dev))
    px = int(torch.randint(0, s - side + 1, (1,), generator=gen, device=dev))
    region = img[:, py : py + side, px : px + side]
    region[:, mask] = crop[:, mask]
    label[py : py + side, px : px + side][mask] = 3


def crops(
    img: torch.Tensor, label: torch.Tensor, n: int, size: int, gen: torch.Generator, context: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``n`` random (size x size) crops with labels, and with ``context`` > 1 the centred context tiles
    (size x size at ``context`` times coarser, area-averaged, white outside the canvas)."""
    s = img.shape[-1]
    dev = img.device
    ys = torch.randint(0, s - size + 1, (n,), generator=gen, device=dev).tolist()
    xs = torch.randint(0, s - size + 1, (n,), generator=gen, device=dev).tolist()
    x = torch.stack([img[:, y : y + size, xx : xx + size] for y, xx in zip(ys, xs, strict=True)])
    t = torch.stack([label[y : y + size, xx : xx + size] for y, xx in zip(ys, xs, strict=True)]).long()
    ctx = None
    if context > 1:
        big = size * context
        pad = (big - size) // 2
        padded = F.pad(img[None], (pad, pad, pad, pad), value=1.0)[0]
        ctx = torch.stack(
            [
                F.avg_pool2d(padded[None, :, y : y + big, xx : xx + big], context)[0]
                for y, xx in zip(ys, xs, strict=True)
            ]
        )
    return x, t, ctx


def median_frequency_weights(labels: torch.Tensor, n_classes: int = len(CLASSES)) -> torch.Tensor:
    """Eigen & Fergus: weight_c = median(freq) / freq_c, freq over the labelled pixels (255 ignored)."""
    counts = torch.bincount(labels[labels != IGNORE].flatten(), minlength=n_classes).float()
    freq = counts / counts.sum().clamp_min(1)
    present = freq > 0
    w = torch.zeros(n_classes, device=labels.device)
    w[present] = freq[present].median() / freq[present]
    return w


def load_sources(pack: Path, device: torch.device) -> CanvasSource:
    """Pools from a pack written by ``python -m zoo.train.multiclass_data``."""
    s1, gl = load_pack(pack, "stage1"), load_pack(pack, "glass")
    x = to_tensor(s1.decode(), device)
    y = torch.from_numpy(s1.labels).to(device)
    g = to_tensor(gl.decode(), device)
    with np.load(pack) as z:
        arts = artefact_tensors({k: z[k] for k in z.files if k.startswith(ARTEFACTS)}, device)
    return CanvasSource(x[y == 1], x[y == 0], g, arts)


def artefact_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(RGB (3, H, W) uint8, mask (H, W) bool) tensors of the :func:`artefact_arrays` crops, in ``ARTEFACTS`` order."""
    return [
        (torch.from_numpy(arrays[f"{n}_rgb"].transpose(2, 0, 1).copy()).to(device),
         torch.from_numpy(arrays[f"{n}_mask"]).to(device))
        for n in ARTEFACTS
    ]  # fmt: skip


def train_segmenter(
    net: nn.Module,
    source: CanvasSource,
    steps: int,
    batch: int,
    size: int,
    seed: int,
    context: int = 0,
    lr: float = 0.01,
    stain_aug: bool = True,
    log_every: int = 100,
) -> dict[str, object]:
    """SGD (momentum 0.9) on weighted cross-entropy; a fresh canvas every 4 steps; returns a summary."""
    dev = source.tumour.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    # class weights from 8 canvases drawn with the same generator settings
    wgen = torch.Generator(device=dev).manual_seed(seed + 1000)
    weights = median_frequency_weights(torch.cat([source.canvas(wgen)[1].flatten() for _ in range(8)]))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    amp = dev.type == "cuda"
    log, t0 = LossLog(steps, log_every, digits=4), time.perf_counter()
    img = label = None
    for step in range(1, steps + 1):
        if img is None or step % 4 == 1:
            img, label = source.canvas(gen)
        assert img is not None and label is not None
        x, t, ctx = crops(img, label, batch, size, gen, context)
        if stain_aug:  # same stain draw for a tile and its context
            both = x if ctx is None else torch.cat([x, ctx], 0)
            both = stains.train_stain_augment(both, gen)
            x, ctx = (both, None) if ctx is None else (both[:batch], both[batch:])
        k = int(torch.randint(0, 4, (1,), generator=gen, device=dev))
        flip = bool(torch.randint(0, 2, (1,), generator=gen, device=dev))

        def geo(a: torch.Tensor, k: int = k, flip: bool = flip) -> torch.Tensor:
            a = torch.rot90(a, k, dims=(-2, -1))
            return a.flip(-1) if flip else a

        x, t = geo(x), geo(t)
        if ctx is not None:
            ctx = geo(ctx)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = (net.logits(x) if ctx is None else net.logits(x, ctx)).float()  # type: ignore[operator]
        loss = F.cross_entropy(logits, t, weight=weights, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.add(step, loss.item())
    net.eval()
    return {
        "steps": steps,
        "batch": batch,
        "tile_px": size,
        "context_factor": context or None,
        "optimiser": f"SGD momentum 0.9, lr {lr} cosine",
        "class_weights_median_frequency": [round(float(w), 4) for w in weights],
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_log": log.entries,
    }


def train_models(
    pack: Path, out: Path, models: list[tuple[str, nn.Module, int]], steps: int, batch: int, size: int, seed: int
) -> dict[str, object]:
    """Train each (name, net, context factor) on the pack's composites with :func:`train_segmenter`;
    save ``<name>.pt`` and a ``train.json`` after each."""
    dev = device()
    source = load_sources(pack, dev)
    summary: dict[str, object] = {"device": device_name(dev)}
    out.mkdir(parents=True, exist_ok=True)
    for name, net, ctx in models:
        net = net.to(dev)
        s = train_segmenter(net, source, steps, batch, size, seed, context=ctx)
        s["parameters"] = count_parameters(net)
        save_state(net, out / f"{name}.pt")
        summary[name] = s
        (out / "train.json").write_text(json.dumps(summary, indent=1))
    return summary


def _data_arguments(p: Any) -> None:
    """The training data options of train-full and finetune: PCam, the glass slide, the artefact crops."""
    p.add_argument("--zip", type=Path, default=Path("../shared/data/pcam/pcam-ai4all-trainval.zip"), help="PCam zip")
    p.add_argument("--glass-slide", type=Path, default=Path("../shared/data/slides/kidney-48-5.tif"), help="glass")
    p.add_argument("--images", type=Path, default=Path("../shared/data/images"), help="artefact crops folder")


def family_main(
    argv: list[str] | None,
    module: str,
    doc: str,
    train: Callable[[Path, Path, int, int, int], dict[str, object]],
    export: Callable[[Path, Path], dict[str, float]],
    model: str,
    batch: int,
    tile_px: int,
    make_net: Callable[..., nn.Module] | None = None,
    context: int = 0,
) -> int:
    """The ``train``/``train-full``/``export`` command line shared by the multi-class model families."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="1.0: train the model and its baseline from a pack (grid composites)")
    t.add_argument("--pack", type=Path, required=True, help="pack .npz (python -m zoo.train.multiclass_data)")
    t.add_argument("--out", type=Path, required=True, help="folder for the state dicts and train.json")
    t.add_argument("--steps", type=int, default=1500, help="SGD steps per model")
    t.add_argument("--batch", type=int, default=batch, help=f"{tile_px} px tiles per step")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    f = sub.add_parser("train-full", help="1.1: all PCam patches, seamless composites, hard negatives")
    _data_arguments(f)
    f.add_argument("--out", type=Path, required=True, help=f"folder for {model}.pt and train.json")
    f.add_argument("--steps", type=int, default=2400, help="AdamW steps of round 1")
    f.add_argument("--hard-steps", type=int, default=800, help="steps of round 2, on hard negatives (0: none)")
    f.add_argument("--batch", type=int, default=8, help="tiles per step")
    f.add_argument("--tile", type=int, default=256, help="training tile size in px (the network is convolutional)")
    f.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    f.add_argument("--eval-composites", type=int, default=20, help="held-out composites to report on")
    f.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of the encoder as a PCam patch classifier")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    u = sub.add_parser("finetune", help="1.1: continue a train-full state with the Tumour class weighted")
    _data_arguments(u)
    u.add_argument("--state", type=Path, required=True, help=f"folder with {model}.pt (and its train.json)")
    u.add_argument("--out", type=Path, required=True, help=f"folder for the new {model}.pt and train.json")
    u.add_argument("--steps", type=int, default=400, help="AdamW steps")
    u.add_argument("--batch", type=int, default=8, help="tiles per step")
    u.add_argument("--tile", type=int, default=256, help="training tile size in px")
    u.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (one-cycle)")
    u.add_argument("--tumour-weight", type=float, default=3.0, help="cross-entropy weight of the Tumour class")
    u.add_argument("--eval-composites", type=int, default=20, help="held-out composites to report on")
    u.add_argument("--seed", type=int, default=3, help="random seed")
    h = sub.add_parser("train-head", help="1.1: encoder + patch head on PCam, then the segmenter around them")
    _data_arguments(h)
    h.add_argument("--out", type=Path, required=True, help=f"folder for {model}.pt and train.json")
    h.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of the encoder and head on PCam patches")
    h.add_argument("--steps", type=int, default=1000, help="AdamW steps of the segmenter (encoder frozen)")
    h.add_argument("--batch", type=int, default=8, help="tiles per step")
    h.add_argument("--tile", type=int, default=256, help="training tile size in px")
    h.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    h.add_argument("--eval-composites", type=int, default=20, help="held-out composites to report on")
    h.add_argument("--seed", type=int, default=0, help="random seed")
    n = sub.add_parser("tune-head", help="1.1: choose the patch head's window and threshold on select composites")
    _data_arguments(n)
    n.add_argument("--state", type=Path, required=True, help=f"folder with a train-head {model}.pt")
    n.add_argument("--out", type=Path, required=True, help=f"folder for the tuned {model}.pt and train.json")
    n.add_argument("--tile", type=int, default=256, help="tile size in px")
    n.add_argument(
        "--select-composites", type=int, default=8, help="select composites with tumour (half as many without)"
    )
    n.add_argument("--eval-composites", type=int, default=20, help="held-out composites to report on")
    n.add_argument("--seed", type=int, default=0, help="random seed")
    e = sub.add_parser("export", help=f"export {model}.onnx")
    e.add_argument("--state", type=Path, required=True, help=f"folder with {model}.pt")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument(
        "--test-from", type=Path, default=None,
        help="a bundled input to reuse (.npy: image; .npz: image and context): writes test_input and test_expected "
        "(the torch network's output) beside the ONNX",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.cmd == "train":
        s = train(a.pack, a.out, a.steps, a.batch, a.seed)
        print(json.dumps({k: v["seconds"] for k, v in s.items() if isinstance(v, dict)}))
    elif a.cmd == "train-full":
        from zoo.train.multiclass_recipe import train_full

        if make_net is None:
            raise SystemExit(f"{module}: no train-full recipe")
        train_full(
            make_net(), model, context, a.zip, a.glass_slide, a.images, a.out, a.steps, a.hard_steps, a.batch,
            a.tile, a.seed, a.lr, eval_composites=a.eval_composites, pretrain_epochs=a.pretrain_epochs,
        )  # fmt: skip
    elif a.cmd == "finetune":
        from zoo.train.multiclass_recipe import finetune

        if make_net is None:
            raise SystemExit(f"{module}: no finetune recipe")
        finetune(
            make_net(), model, context, a.zip, a.glass_slide, a.images, a.state, a.out, a.steps, a.batch, a.tile,
            a.seed, a.lr, a.tumour_weight, eval_composites=a.eval_composites,
        )  # fmt: skip
    elif a.cmd == "train-head":
        from zoo.train.multiclass_recipe import train_head

        if make_net is None:
            raise SystemExit(f"{module}: no train-head recipe")
        train_head(
            make_net(patch_head=True), model, context, a.zip, a.glass_slide, a.images, a.out, a.pretrain_epochs,
            a.steps, a.batch, a.tile, a.seed, a.lr, eval_composites=a.eval_composites,
        )  # fmt: skip
    elif a.cmd == "tune-head":
        from zoo.train.multiclass_recipe import tune

        if make_net is None:
            raise SystemExit(f"{module}: no tune-head recipe")
        tune(
            make_net(patch_head=True), model, context, a.zip, a.glass_slide, a.images, a.state, a.out, a.tile, a.seed,
            a.select_composites, a.eval_composites,
        )  # fmt: skip
    else:
        res = export(a.state, a.out)
        if a.test_from is not None:
            if make_net is None:
                raise SystemExit(f"{module}: no network to write a bundled test with")
            keys = torch.load(a.state / f"{model}.pt", map_location="cpu").keys()
            net = make_net(patch_head=True) if any(k.startswith("tumour.") for k in keys) else make_net()
            res["bundled_test_max_abs_diff_onnx_vs_torch"] = write_bundled_test(net, model, a.state, a.out, a.test_from)
        print(json.dumps(res))
    return 0


def write_bundled_test(net: nn.Module, model: str, state_dir: Path, out_dir: Path, source: Path) -> float:
    """Copy ``source``'s input arrays to ``out_dir`` as the bundled test, with the torch network's output as the
    expected output; return the exported ONNX's largest difference from it on that input."""
    net.load_state_dict(torch.load(state_dir / f"{model}.pt", map_location="cpu"))
    if source.suffix == ".npz":
        with np.load(source) as z:
            arrays = {k: np.asarray(z[k], np.float32) for k in z.files}
    else:
        arrays = {"image": np.asarray(np.load(source), np.float32)}
    from zoo.train.export import bundle_test

    return bundle_test(net, out_dir / f"{model}.onnx", arrays)


@torch.no_grad()
def predict_canvas(
    predict: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    img: torch.Tensor,
    size: int,
    overlap: float = 0.25,
    context: int = 0,
    batch: int = 8,
) -> torch.Tensor:
    """Tiled prediction of a canvas ((3, S, S)) with overlap averaging -> (C, S, S) probabilities."""
    s = img.shape[-1]
    stride = max(1, int(size * (1 - overlap)))
    pos = list(range(0, s - size + 1, stride))
    if pos[-1] != s - size:
        pos.append(s - size)
    acc = cnt = None
    tiles = [(y, x) for y in pos for x in pos]
    big = size * max(context, 1)
    pad = (big - size) // 2
    padded = F.pad(img[None], (pad, pad, pad, pad), value=1.0)[0] if context > 1 else None
    for i in range(0, len(tiles), batch):
        b = tiles[i : i + batch]
        x = torch.stack([img[:, y : y + size, xx : xx + size] for y, xx in b])
        ctx = None
        if padded is not None:
            ctx = torch.stack([F.avg_pool2d(padded[None, :, y : y + big, xx : xx + big], context)[0] for y, xx in b])
        p = predict(x, ctx)
        if acc is None:
            acc = torch.zeros(p.shape[1], s, s, device=img.device)
            cnt = torch.zeros(s, s, device=img.device)
        for (y, xx), pp in zip(b, p, strict=True):
            acc[:, y : y + size, xx : xx + size] += pp
            cnt[y : y + size, xx : xx + size] += 1  # type: ignore[index]
    assert acc is not None and cnt is not None
    return acc / cnt.clamp_min(1)


def per_class_dice(pred: torch.Tensor, label: torch.Tensor, n_classes: int = len(CLASSES)) -> list[float | None]:
    """Dice per class over labelled pixels (None where the class is absent from both)."""
    keep = label != IGNORE
    out: list[float | None] = []
    for c in range(n_classes):
        a, b = (pred == c) & keep, (label == c) & keep
        s = int(a.sum()) + int(b.sum())
        out.append(None if s == 0 else 2 * int((a & b).sum()) / s)
    return out

"""The full-data recipe for the multi-class U-Nets (cd-unet and multilevel-unet 1.1, issue 25).

1.0 learned its composites, not tissue (62% / 29% of tumour-free real lymph-node tissue called Tumor).
What changes:

* **Encoder first**: the U-Net's encoder (behind CD-UNET's colour deconvolution; the multi-level U-Net's
  high-resolution branch) is first trained as a patch classifier on the 20,000 PCam train patches with
  the patch classifiers' recipe (:mod:`zoo.train.pcam_recipe`, global average pooling and a linear layer
  on its deepest features), so it knows tumour from normal tissue before it learns where the boundaries
  are. Trained from scratch on composites alone, the multi-level U-Net called no tumour at all (Tumour Dice
  0.006 on held-out composites, 0.008 on training ones, after 3,200 steps): it settled for the tissue class.
* **Material**: all 20,000 PCam train patches (10,000 tumour, 10,000 non-tumour) instead of 2,400;
  held-out figures come from PCam ``valid`` (other slides), never trained on.
* **Seamless composites** (:mod:`zoo.train.seamless`): regions woven from many stain-alike patches of
  one label, no cell grid, irregular borders; a quarter of the canvases hold no tumour at all.
* **Context is real**: canvases are ``canvas_px`` (1024) across, so a 256 px tile's 4x context tile
  is the same composite around it (white only beyond the canvas, as beyond a real slide's tissue).
* **Hard negatives**: after the first round, the model runs on tumour-free composites of the training
  patches; each non-tumour patch is scored by the tumour probability over the pieces cut from it, and the
  second round draws non-tumour patches in proportion to ``1 + hard_weight * score / mean score``.
* **Loss and schedule**: unweighted cross-entropy over labelled pixels (255 ignored; Exclude weighted
  x2, it is thin and rare), AdamW with a one-cycle learning rate, bf16 autocast on CPUs that have it.
* **Augmentation**: the families' own stain augmentation (:func:`zoo.train.stains.train_stain_augment`)
  and the 8 dihedral transforms; a tile and its context tile share each draw.

``train_full`` writes ``<name>.pt`` and ``train.json``: the history, the hard-negative statistics and
:func:`evaluate` on held-out seamless composites (tumour Dice beside the all-tumour baseline, false tumour
on tumour-free composites).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.train import seamless, stains
from zoo.train.multiclass import CLASSES, IGNORE, crops, paste_artefact, per_class_dice, predict_canvas
from zoo.train.patch_head import PatchHead
from zoo.train.pcam_recipe import _amp

TUMOUR = CLASSES.index("Tumour")
TISSUE = CLASSES.index("Tissue")
GLASS_LABEL = CLASSES.index("Background")


@dataclass
class Pools:
    """(N, 3, 96, 96) uint8 pools on one device, the artefact crops, and the patches' colour features."""

    tumour: torch.Tensor
    normal: torch.Tensor
    glass: torch.Tensor
    artefacts: list[tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self) -> None:
        self.features = (seamless.colour_features(self.tumour), seamless.colour_features(self.normal))


class SeamlessSource:
    """Random four-class seamless composites (``canvas_px`` square) with artefact strokes."""

    def __init__(self, pools: Pools, canvas_px: int = 1024, normal_weights: torch.Tensor | None = None) -> None:
        self.pools, self.canvas_px, self.normal_weights = pools, canvas_px, normal_weights

    def composite(self, gen: torch.Generator, p_tumour_free: float = 0.25) -> seamless.Composite:
        p = self.pools
        return seamless.composite(
            p.tumour, p.normal, p.glass, self.canvas_px, gen, p_tumour_free=p_tumour_free,
            normal_weights=self.normal_weights, features=p.features,
        )  # fmt: skip

    def canvas(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) RGB in [0, 1] and (S, S) uint8 labels (255 ignored)."""
        c = self.composite(gen)
        n_art = int(torch.randint(0, 3, (1,), generator=gen, device=c.image.device))
        for _ in range(n_art):
            paste_artefact(c.image, c.label, self.pools.artefacts, gen)
        return c.image, c.label


def load_pools(
    zip_path: Path, split: str, glass_slide: Path, images: Path, seed: int, dev: torch.device, limit: int | None = None
) -> Pools:
    """``split``: ``train`` (all 20,000), or ``select``/``report`` (the PCam valid halves of
    :func:`zoo.train.pcam_recipe.pcam_splits`); glass from ``glass_slide`` (seeded), artefacts from ``images``.
    ``limit`` keeps that many patches, evenly spaced (tests only)."""
    from zoo.train.common import to_tensor
    from zoo.train.multiclass import artefact_arrays, artefact_tensors
    from zoo.train.pcam_recipe import pcam_splits
    from zoo.train.tumour_data import glass_patches

    sp = pcam_splits(zip_path, 0)
    jset = {"train": sp.train, "select": sp.select, "report": sp.report}[split]
    if limit:
        jset = jset.subset(np.linspace(0, len(jset) - 1, limit).astype(int))
    x = to_tensor(jset.decode(), dev)
    y = torch.from_numpy(jset.labels).to(dev)
    glass = to_tensor(glass_patches(glass_slide, 300, seed), dev)
    return Pools(x[y == 1], x[y == 0], glass, artefact_tensors(artefact_arrays(images), dev))


class EncoderClassifier(nn.Module):
    """A U-Net's encoder (after ``pre``) with global average pooling and a linear layer: (N, 3, H, W) -> (N, 2)
    logits, for :func:`pretrain_encoder`. The modules are shared with the segmenter, not copied."""

    def __init__(self, unet: nn.Module, pre: nn.Module, head: PatchHead | None = None) -> None:
        super().__init__()
        self.unet, self.pre, self.head = unet, pre, head
        self.fc = nn.Linear(int(unet.widths[-1]), 2) if head is None else None  # type: ignore[index]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.unet.encode(self.pre(x))[-1]  # type: ignore[operator]
        if self.head is not None:
            return self.head.patch_logits(deep)
        assert self.fc is not None
        return self.fc(deep.mean(dim=(2, 3)))


def encoder_of(net: nn.Module) -> EncoderClassifier:
    """CD-UNET: its colour deconvolution and U-Net; the multi-level U-Net: its high-resolution branch. With the
    network's :class:`PatchHead` (``net.tumour``) as the classifier where it has one."""
    head = getattr(net, "tumour", None)
    if hasattr(net, "high"):
        return EncoderClassifier(net.high, nn.Identity(), head)  # type: ignore[arg-type]
    return EncoderClassifier(net.unet, net.cd, head)  # type: ignore[arg-type]


def pretrain_encoder(
    net: nn.Module, zip_path: Path, epochs: int, seed: int, limit: int | None = None
) -> dict[str, Any]:
    """Train ``net``'s encoder as a PCam patch classifier (:func:`zoo.train.pcam_recipe.fit`, balanced batches of
    128, one-cycle to 2e-3, the best epoch by ``select`` AUC); returns its history. A network with a
    :class:`PatchHead` also gets its temperature and threshold fitted on ``select``, and the figures on
    ``report`` (never used for a choice)."""
    from zoo.train.common import to_tensor
    from zoo.train.pcam_recipe import (
        best_threshold,
        binary_figures,
        bootstrap_ci,
        fit_temperature,
        logits_of,
        pcam_splits,
        tumour_probability,
    )  # fmt: skip
    from zoo.train.pcam_recipe import fit as fit_patches

    dev = next(net.parameters()).device
    sp = pcam_splits(zip_path, seed)
    train, select, report = sp.train, sp.select, sp.report
    if limit:
        train, select, report = (
            s.subset(np.linspace(0, len(s) - 1, limit).astype(int)) for s in (train, select, report)
        )
    clf = encoder_of(net).to(dev)
    select_x = to_tensor(select.decode(), dev)
    out = fit_patches(
        clf, to_tensor(train.decode(), dev), torch.from_numpy(train.labels).to(dev), select_x,
        select.labels, epochs, 128 if not limit else 16, 2e-3, seed, steps_per_epoch=2 if limit else None,
        on_epoch=lambda r: print(json.dumps({"encoder": r}), flush=True),
    )  # fmt: skip
    res: dict[str, Any] = {"epochs": epochs, "best_epoch": out["best_epoch"], "history": out["history"]}
    head = clf.head
    if head is not None:
        sel_logits = logits_of(clf, select_x, tta=False)
        temperature = fit_temperature(sel_logits, select.labels)
        threshold = best_threshold(tumour_probability(sel_logits, temperature), select.labels)
        head.temperature.fill_(temperature)
        head.threshold.fill_(threshold)
        p = tumour_probability(logits_of(clf, to_tensor(report.decode(), dev), tta=False), temperature)
        res["patch_head"] = {
            "temperature": temperature, "threshold_select": threshold,
            "report": {**binary_figures(p, report.labels, threshold),
                       "ci95": bootstrap_ci(p, report.labels, threshold)},
        }  # fmt: skip
        _show({"patch_head": res["patch_head"]})
    net.train()
    return res


def _forward(net: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    return net.logits(x) if ctx is None else net.logits(x, ctx)  # type: ignore[operator]


def fit(
    net: nn.Module,
    source: SeamlessSource,
    steps: int,
    batch: int,
    tile_px: int,
    seed: int,
    context: int = 0,
    lr: float = 2e-3,
    reuse: int = 2,
    on_log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 100,
    tumour_weight: float = 1.0,
    frozen: list[nn.Module] | None = None,
) -> dict[str, Any]:
    """AdamW one-cycle on cross-entropy (Exclude x2, Tumour x ``tumour_weight``); a fresh canvas every ``reuse``
    steps. ``frozen`` modules keep their weights and batch-norm statistics, and Tumour pixels are learned as
    Tissue (the network's patch head decides tumour)."""
    dev = source.pools.normal.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    torch.manual_seed(seed)
    amp = _amp(dev)
    weight = torch.ones(len(CLASSES), device=dev)
    weight[CLASSES.index("Exclude")] = 2.0
    weight[TUMOUR] = tumour_weight
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for m in frozen or []:
        m.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    for m in frozen or []:
        m.eval()
    log: list[dict[str, float]] = []
    running, t0 = 0.0, time.perf_counter()
    img = label = None
    for step in range(1, steps + 1):
        if img is None or step % reuse == 1 or reuse == 1:
            img, label = source.canvas(gen)
        assert img is not None and label is not None
        x, t, ctx = crops(img, label, batch, tile_px, gen, context)
        if frozen:
            t = torch.where(t == TUMOUR, TISSUE, t)
        both = x if ctx is None else torch.cat([x, ctx], 0)
        both = stains.train_stain_augment(both, gen)
        k = int(torch.randint(0, 8, (1,), generator=gen, device=dev))
        both, t = seamless.dihedral(both, k), seamless.dihedral(t, k)
        x, ctx = (both, None) if ctx is None else (both[:batch], both[batch:])
        x = x.contiguous(memory_format=torch.channels_last)
        if ctx is not None:
            ctx = ctx.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = _forward(net, x, ctx).float()
        loss = F.cross_entropy(logits, t, weight=weight, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            row = {"step": step, "loss": round(running / n, 4), "seconds": round(time.perf_counter() - t0, 1)}
            log.append(row)
            running = 0.0
            if on_log is not None:
                on_log(row)
    net.eval()
    return {"steps": steps, "batch": batch, "tile_px": tile_px, "lr": lr, "bf16_autocast": amp,
            "class_weights": [round(float(w), 3) for w in weight], "tumour_learned_as_tissue": bool(frozen),
            "log": log}  # fmt: skip


def _predict_fn(net: nn.Module, amp: bool) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    def run(x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            return (net(x) if ctx is None else net(x, ctx)).float()  # probabilities, as exported

    return run


@torch.no_grad()
def mine_hard_negatives(
    net: nn.Module, source: SeamlessSource, canvases: int, tile_px: int, context: int, seed: int, hard_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-patch sampling weights of the non-tumour pool: ``1 + hard_weight * score / mean score``, where a
    patch's score is the mean tumour probability over the pieces cut from it on tumour-free composites."""
    pools = source.pools
    dev = pools.normal.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    run = _predict_fn(net.eval(), _amp(dev))
    score = torch.zeros(len(pools.normal), device=dev)
    uses = torch.zeros(len(pools.normal), device=dev)
    called = []
    for _ in range(canvases):
        c = source.composite(gen, p_tumour_free=1.0)
        probs = predict_canvas(run, c.image, tile_px, overlap=0.25, context=context)
        prob = probs[TUMOUR]
        score += seamless.piece_scores(c.normal, prob, len(pools.normal))
        uses += seamless.piece_scores(c.normal, torch.ones_like(prob), len(pools.normal))
        tissue = c.label == TISSUE
        called.append(float(((probs.argmax(0) == TUMOUR) & tissue).sum() / tissue.sum().clamp_min(1)))
    mean_p = torch.where(uses > 0, score / uses.clamp_min(1e-6), torch.zeros_like(score))
    seen = uses > 0
    norm = mean_p / mean_p[seen].mean().clamp_min(1e-6)
    weights = 1.0 + hard_weight * norm
    stats = {
        "canvases": canvases,
        "patches_seen": int(seen.sum()),
        "tumour_called_on_tumour_free_tissue": round(float(np.mean(called)), 4),
        "top_decile_mean_tumour_probability": round(float(torch.quantile(mean_p[seen], 0.9)), 4),
    }
    return weights, stats


@torch.no_grad()
def evaluate(net: nn.Module, source: SeamlessSource, n: int, tile_px: int, context: int, seed: int) -> dict[str, Any]:
    """On ``n`` held-out composites (argmax labels): per-class Dice (mean over composites where the class is
    present), tumour Dice beside the all-tumour baseline (every true tissue pixel called tumour), and on ``n // 2``
    more tumour-free composites the fraction of tissue called Tumor."""
    dev = source.pools.normal.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    run = _predict_fn(net.eval(), _amp(dev))
    per_class: list[list[float]] = [[] for _ in CLASSES]
    tumour_dice, baseline = [], []
    for _ in range(n):
        img, label = source.canvas(gen)
        pred = predict_canvas(run, img, tile_px, overlap=0.25, context=context).argmax(0)
        for k, d in enumerate(per_class_dice(pred, label)):
            if d is not None:
                per_class[k].append(d)
        if (label == TUMOUR).any():
            tumour_dice.append(per_class_dice(pred, label)[TUMOUR] or 0.0)
            # "everything is tumour": every true tissue pixel called Tumor (a perfect tissue detector)
            all_tumour = torch.where((label == TISSUE) | (label == TUMOUR), TUMOUR, GLASS_LABEL)
            baseline.append(per_class_dice(all_tumour, label)[TUMOUR] or 0.0)
    false_tumour = []
    for _ in range(max(1, n // 2)):
        c = source.composite(gen, p_tumour_free=1.0)
        pred = predict_canvas(run, c.image, tile_px, overlap=0.25, context=context).argmax(0)
        tissue = c.label == TISSUE
        false_tumour.append(float(((pred == TUMOUR) & tissue).sum() / tissue.sum().clamp_min(1)))
    return {
        "composites": n,
        "dice": {name: round(float(np.mean(v)), 4) if v else None for name, v in zip(CLASSES, per_class, strict=True)},
        "tumour_dice": round(float(np.mean(tumour_dice)), 4) if tumour_dice else None,
        "all_tumour_baseline_dice": round(float(np.mean(baseline)), 4) if baseline else None,
        "tumour_free_composites": len(false_tumour),
        "tumour_called_on_tumour_free_tissue": round(float(np.mean(false_tumour)), 4),
    }


def train_full(
    net: nn.Module,
    name: str,
    context: int,
    zip_path: Path,
    glass_slide: Path,
    images: Path,
    out: Path,
    steps: int,
    hard_steps: int,
    batch: int,
    tile_px: int,
    seed: int,
    lr: float = 2e-3,
    hard_weight: float = 4.0,
    eval_composites: int = 20,
    canvas_px: int = 1024,
    limit: int | None = None,
    pretrain_epochs: int = 8,
) -> dict[str, Any]:
    """The encoder as a patch classifier (``pretrain_epochs``), round 1 (``steps``), hard-negative mining, round 2
    (``hard_steps``, at half the learning rate), then :func:`evaluate` on ``report``-split composites; saves
    ``out/<name>.pt`` and ``out/train.json``."""
    from zoo.train.common import count_parameters, device, device_name

    dev = device()
    t0 = time.perf_counter()
    net = net.to(dev)
    train = SeamlessSource(load_pools(zip_path, "train", glass_slide, images, seed, dev, limit), canvas_px)
    out.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "seed": seed, "network": type(net).__name__,
        "parameters": count_parameters(net), "context_factor": context or None,
        "data": {"tumour": len(train.pools.tumour), "non_tumour": len(train.pools.normal),
                 "glass": len(train.pools.glass), "glass_slide": glass_slide.name},
        "recipe": __doc__.split("What changes:")[1].split("``train_full``")[0].strip() if __doc__ else "",
    }  # fmt: skip
    if pretrain_epochs:
        summary["encoder_pretraining"] = pretrain_encoder(net, zip_path, pretrain_epochs, seed, limit)
    summary["round1"] = fit(net, train, steps, batch, tile_px, seed, context, lr, on_log=_show)
    _score_training(summary, "round1_training_composites", net, train, tile_px, context, seed)
    if hard_steps > 0:
        mined = 1 if limit else 24
        weights, stats = mine_hard_negatives(net, train, mined, tile_px, context, seed + 1, hard_weight)
        print(json.dumps({"hard_negatives": stats}), flush=True)
        summary["hard_negatives"] = stats
        hard = SeamlessSource(train.pools, canvas_px, normal_weights=weights)
        summary["round2"] = fit(net, hard, hard_steps, batch, tile_px, seed + 2, context, lr / 2, on_log=_show)
    held = SeamlessSource(load_pools(zip_path, "report", glass_slide, images, seed + 100, dev, limit), canvas_px)
    return _save_and_report(net, name, out, summary, held, eval_composites, tile_px, context, seed, t0)


def finetune(
    net: nn.Module,
    name: str,
    context: int,
    zip_path: Path,
    glass_slide: Path,
    images: Path,
    state: Path,
    out: Path,
    steps: int,
    batch: int,
    tile_px: int,
    seed: int,
    lr: float,
    tumour_weight: float,
    eval_composites: int = 20,
    canvas_px: int = 1024,
    limit: int | None = None,
) -> dict[str, Any]:
    """Continue ``state/<name>.pt`` for ``steps`` with the Tumour class weighted ``tumour_weight`` (for a network
    that settled for calling tumour Tissue), then :func:`evaluate` on training and ``report`` composites; saves
    ``out/<name>.pt`` and ``out/train.json`` (with the starting state's train.json as ``started_from``)."""
    t0 = time.perf_counter()
    net, dev, summary = _resume(net, name, state, out, seed)
    train = SeamlessSource(load_pools(zip_path, "train", glass_slide, images, seed, dev, limit), canvas_px)
    summary["finetune"] = fit(net, train, steps, batch, tile_px, seed, context, lr, on_log=_show,
                              tumour_weight=tumour_weight)  # fmt: skip
    _score_training(summary, "finetune_training_composites", net, train, tile_px, context, seed)
    held = SeamlessSource(load_pools(zip_path, "report", glass_slide, images, seed + 100, dev, limit), canvas_px)
    return _save_and_report(net, name, out, summary, held, eval_composites, tile_px, context, seed, t0)


def train_head(
    net: nn.Module,
    name: str,
    context: int,
    zip_path: Path,
    glass_slide: Path,
    images: Path,
    out: Path,
    pretrain_epochs: int,
    steps: int,
    batch: int,
    tile_px: int,
    seed: int,
    lr: float = 2e-3,
    eval_composites: int = 20,
    canvas_px: int = 1024,
    limit: int | None = None,
) -> dict[str, Any]:
    """1.1 with a patch head (``net.tumour``, :mod:`zoo.train.patch_head`): the encoder and head trained as a PCam
    patch classifier (``pretrain_epochs``, temperature and threshold from ``select``), then frozen while the rest
    of the segmenter learns Background / Tissue (Tumour pixels count as Tissue) / Exclude on seamless composites
    (``steps``); :func:`evaluate` on ``report`` composites. Saves ``out/<name>.pt`` and ``out/train.json``."""
    from zoo.train.common import count_parameters, device, device_name

    if getattr(net, "tumour", None) is None:
        raise ValueError(f"{name}: the network has no patch head; build it with patch_head=True")
    dev = device()
    t0 = time.perf_counter()
    net = net.to(dev)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "seed": seed, "network": type(net).__name__,
        "parameters": count_parameters(net), "context_factor": context or None, "recipe": train_head.__doc__,
    }  # fmt: skip
    summary["encoder_pretraining"] = pretrain_encoder(net, zip_path, pretrain_epochs, seed, limit)
    clf = encoder_of(net)
    frozen: list[nn.Module] = [clf.pre, clf.unet.down, net.tumour]  # type: ignore[list-item]
    train = SeamlessSource(load_pools(zip_path, "train", glass_slide, images, seed, dev, limit), canvas_px)
    summary["data"] = {"tumour": len(train.pools.tumour), "non_tumour": len(train.pools.normal),
                       "glass": len(train.pools.glass), "glass_slide": glass_slide.name}  # fmt: skip
    summary["segmenter"] = fit(net, train, steps, batch, tile_px, seed, context, lr, on_log=_show, frozen=frozen)
    _score_training(summary, "training_composites", net, train, tile_px, context, seed)
    held = SeamlessSource(load_pools(zip_path, "report", glass_slide, images, seed + 100, dev, limit), canvas_px)
    return _save_and_report(net, name, out, summary, held, eval_composites, tile_px, context, seed, t0)


@torch.no_grad()
def tune_head(
    net: nn.Module,
    source: SeamlessSource,
    n: int,
    tile_px: int,
    context: int,
    seed: int,
    windows: tuple[int, ...] = (5, 7, 9),
    thresholds: tuple[float, ...] = (0.6, 0.7, 0.8),
    max_false: float = 0.05,
) -> dict[str, Any]:
    """Choose the patch head's window (in 16 px feature steps) and threshold on ``select`` composites: the highest
    tumour Dice among the candidates that call at most ``max_false`` of tumour-free tissue Tumor (else the one that
    calls least); candidates are every window with the threshold fitted on ``select`` patches and each of
    ``thresholds``. Sets the head's buffers; returns every candidate's figures and the choice."""
    head = net.tumour
    assert isinstance(head, PatchHead)
    fitted = round(float(head.threshold), 4)
    rows = []
    for w in windows:
        for t in sorted({fitted, *thresholds}):
            head.window.fill_(w)
            head.threshold.fill_(t)
            ev = evaluate(net, source, n, tile_px, context, seed)
            rows.append({"window": w, "threshold": t, "tumour_dice": ev["tumour_dice"],
                         "all_tumour_baseline_dice": ev["all_tumour_baseline_dice"],
                         "tumour_called_on_tumour_free_tissue": ev["tumour_called_on_tumour_free_tissue"]})  # fmt: skip
            _show({"tune_head": rows[-1]})
    ok = [r for r in rows if r["tumour_called_on_tumour_free_tissue"] <= max_false]
    best = (
        max(ok, key=lambda r: (r["tumour_dice"] or 0.0, -r["threshold"]))
        if ok
        else min(rows, key=lambda r: r["tumour_called_on_tumour_free_tissue"])
    )
    head.window.fill_(best["window"])
    head.threshold.fill_(best["threshold"])
    return {"split": "select", "composites": n, "max_false": max_false, "threshold_fitted_on_patches": fitted,
            "candidates": rows, "chosen": best}  # fmt: skip


def tune(
    net: nn.Module,
    name: str,
    context: int,
    zip_path: Path,
    glass_slide: Path,
    images: Path,
    state: Path,
    out: Path,
    tile_px: int,
    seed: int,
    select_composites: int = 8,
    eval_composites: int = 20,
    canvas_px: int = 1024,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load ``state/<name>.pt`` (a train-head state), :func:`tune_head` on composites woven from the PCam valid
    ``select`` half, then :func:`evaluate` on ``report`` composites; saves ``out/<name>.pt`` and ``out/train.json``
    (with the starting state's train.json as ``started_from``)."""
    t0 = time.perf_counter()
    net, dev, summary = _resume(net, name, state, out, seed)
    net.eval()
    select = SeamlessSource(load_pools(zip_path, "select", glass_slide, images, seed + 300, dev, limit), canvas_px)
    summary["tune_head"] = tune_head(net, select, select_composites, tile_px, context, seed + 300)
    held = SeamlessSource(load_pools(zip_path, "report", glass_slide, images, seed + 100, dev, limit), canvas_px)
    return _save_and_report(net, name, out, summary, held, eval_composites, tile_px, context, seed, t0)


def _resume(
    net: nn.Module, name: str, state: Path, out: Path, seed: int
) -> tuple[nn.Module, torch.device, dict[str, Any]]:
    """``net`` with ``state/<name>.pt`` loaded, on the training device; ``out`` created; a summary that records the
    starting state's train.json as ``started_from``."""
    from zoo.train.common import device, device_name

    dev = device()
    net.load_state_dict(torch.load(state / f"{name}.pt", map_location="cpu"))
    out.mkdir(parents=True, exist_ok=True)
    before = state / "train.json"
    summary: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "seed": seed,
        "started_from": json.loads(before.read_text()) if before.is_file() else str(state),
    }  # fmt: skip
    return net.to(dev), dev, summary


def _show(row: dict[str, Any]) -> None:
    """A training log row on stdout, as it happens."""
    print(json.dumps(row), flush=True)


def _score_training(
    summary: dict[str, Any], key: str, net: nn.Module, source: SeamlessSource, tile_px: int, context: int, seed: int
) -> None:
    """:func:`evaluate` on 2 training composites into ``summary[key]`` and on stdout (does it fit what it saw?)."""
    summary[key] = evaluate(net, source, 2, tile_px, context, seed + 50)
    _show({key: summary[key]})


def _save_and_report(
    net: nn.Module,
    name: str,
    out: Path,
    summary: dict[str, Any],
    held: SeamlessSource,
    n: int,
    tile_px: int,
    context: int,
    seed: int,
    t0: float,
) -> dict[str, Any]:
    """Save ``out/<name>.pt``, evaluate on ``n`` held-out composites, write ``out/train.json``; the summary."""
    from zoo.train.common import save_state

    save_state(net, out / f"{name}.pt")
    summary["evaluation_report_composites"] = evaluate(net, held, n, tile_px, context, seed + 200)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["evaluation_report_composites"]), flush=True)
    return summary

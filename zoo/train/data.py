"""Training data for ``tissue-multires``, built only from real images in ``shared/data``.

Three kinds of source, all held in memory (the images are small):

* **slides** (real WSIs) at several pyramid levels, real (TCGA level 1) and
  area-averaged virtual ones (downsample 1, 2, 4, 8, 16), labelled by
  :func:`zoo.tissue.reference_labels` computed once at a coarse level and resized,
  so labels agree across levels;
* **thumbnails with artefacts** (HistoQC pen-mark and coverslip crops): reference
  labels minus the dilated artefact masks, so pens and coverslip edges are background;
* **composites**: real tissue-only crops (H&E, IHC) cut into smooth random blobs
  and pasted onto real glass (blank regions of the kidney slide), with exact masks.

Patches are sampled as in the paper: centre on background 25%, foreground 25%,
mask edge 50%. Augmentation: flips, 90° rotations, HED and HSV jitter, brightness,
blur, and pure-white "unscanned" rectangles over glass (see :func:`unscanned_rectangle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from zoo.slide import open_slide, thumbnail
from zoo.tissue import reference_labels


@dataclass
class Sample:
    """One image at one resolution with its binary tissue label."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) bool
    edge: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        blurred = ndi.uniform_filter(self.label.astype(np.float32), size=3)
        self.edge = np.abs(blurred - self.label) > 1e-3


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    # As the shipped weights were trained (numpy mean, round half to even). The runner uses
    # zoo.slide.box_reduce (round half up); the two differ by at most one grey level.
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3)).round().astype(np.uint8)


def _resize_label(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(label.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


def slide_samples(path: Path, factors: tuple[int, ...] = (1, 2, 4, 8, 16), label_side_px: int = 800) -> list[Sample]:
    """A slide at several downsamples, labelled consistently from one coarse labelling."""
    out: list[Sample] = []
    with open_slide(path) as slide:
        thumb, _ = thumbnail(slide, max_side_px=label_side_px)
        coarse = reference_labels(thumb)
        level = 0
        w, h = slide.level_dimensions[level]
        full = slide.read_region((0, 0), level, (w, h))  # small test slides only
    for f in factors:
        img = _downsample(full, f) if f > 1 else full
        if min(img.shape[:2]) < 96:
            continue
        out.append(Sample(f"{path.name}@ds{f}", img, _resize_label(coarse, img.shape[:2])))
    return out


def artefact_samples(image_path: Path, mask_path: Path, dilate_px: int = 4) -> list[Sample]:
    """A HistoQC thumbnail: reference labels with the (dilated) artefact mask removed."""
    img = np.asarray(Image.open(image_path).convert("RGB"))
    art = np.asarray(Image.open(mask_path).convert("L").resize(img.shape[1::-1])) > 0
    art = ndi.binary_dilation(art, iterations=dilate_px)
    label = reference_labels(img) & ~art
    return [Sample(image_path.name, img, label)]


def _blob_mask(shape: tuple[int, int], rng: np.random.Generator, coverage: float) -> np.ndarray:
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / rng.uniform(6, 14))
    return noise > np.quantile(noise, 1.0 - coverage)


def composite_samples(
    tissue_paths: list[Path], glass: np.ndarray, rng: np.random.Generator, n_per_source: int = 4, size_px: int = 384
) -> list[Sample]:
    """Real tissue crops in random blob shapes on real glass, with exact masks."""
    out: list[Sample] = []
    gh, gw = glass.shape[:2]
    for tp in tissue_paths:
        tissue = np.asarray(Image.open(tp).convert("RGB"))
        for k in range(n_per_source):
            f = int(rng.choice([1, 2])) if min(tissue.shape[:2]) >= 2 * size_px else 1
            t = _downsample(tissue, f) if f > 1 else tissue
            th, tw = t.shape[:2]
            s = min(size_px, th, tw)
            ty, tx = rng.integers(0, th - s + 1), rng.integers(0, tw - s + 1)
            gy, gx = rng.integers(0, gh - s + 1), rng.integers(0, gw - s + 1)
            mask = _blob_mask((s, s), rng, coverage=float(rng.uniform(0.2, 0.7)))
            alpha = ndi.gaussian_filter(mask.astype(np.float32), 0.7)[..., None]
            img = alpha * t[ty : ty + s, tx : tx + s] + (1 - alpha) * glass[gy : gy + s, gx : gx + s]
            out.append(Sample(f"{tp.name}#composite{k}", img.round().astype(np.uint8), mask))
    return out


def glass_from_slide(path: Path, min_side_px: int = 400) -> np.ndarray:
    """The largest tissue-free rectangle band of a (mostly empty) slide, at level 0."""
    with open_slide(path) as slide:
        w, h = slide.dimensions
        img = slide.read_region((0, 0), 0, (w, h))
    label = ndi.binary_dilation(reference_labels(img), iterations=20)
    rows = np.where(label.any(axis=1))[0]
    # take the taller of the bands above / below the tissue
    top, bottom = (rows.min(), rows.max()) if rows.size else (h, h)
    band = img[:top] if top >= h - bottom else img[bottom + 1 :]
    if min(band.shape[:2]) < min_side_px:
        band = img
    return band


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain (HED, HSV), brightness and focus jitter of an RGB uint8 patch."""
    x = img.astype(np.float32) / 255.0
    if rng.random() < 0.7:  # HED jitter (Tellez et al.)
        hed = rgb2hed(x)
        hed = hed * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-0.01, 0.01, size=3)
        x = np.clip(hed2rgb(hed), 0, 1).astype(np.float32)
    if rng.random() < 0.5:  # saturation and per-channel gain (covers IHC hues)
        grey = x.mean(axis=-1, keepdims=True)
        x = grey + (x - grey) * rng.uniform(0.6, 1.4)
        x = x * rng.uniform(0.95, 1.05, size=3)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    if rng.random() < 0.2:
        x = ndi.gaussian_filter(x, sigma=(rng.uniform(0.5, 2.0),) * 2 + (0,))
    return np.clip(x, 0, 1)


def unscanned_rectangle(x: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint pure white over the background pixels of a random rectangle touching a patch edge.

    Scanners leave unscanned areas that OpenSlide returns as transparent and the runner
    fills with white; next to real (slightly tinted) glass this makes straight glass/white
    steps that must not be read as a tissue border. Labels are unchanged (both are background).
    """
    p = x.shape[0]
    out = x.copy()
    w, h = rng.integers(p // 8, p), rng.integers(p // 8, p)
    side = int(rng.integers(4))
    x0 = 0 if side == 0 else (p - w if side == 1 else int(rng.integers(0, p - w + 1)))
    y0 = 0 if side == 2 else (p - h if side == 3 else int(rng.integers(0, p - h + 1)))
    region = np.zeros(label.shape, bool)
    region[y0 : y0 + h, x0 : x0 + w] = True
    out[region & (label < 0.5)] = 1.0
    return out


class PatchSampler:
    """Edge-weighted random patches (bg 25%, fg 25%, edge 50%) from a list of samples."""

    def __init__(self, samples: list[Sample], patch_px: int, seed: int) -> None:
        self.samples = [s for s in samples if min(s.image.shape[:2]) >= patch_px // 2]
        self.patch_px = patch_px
        self.rng = np.random.default_rng(seed)
        self._where = [
            (np.argwhere(~s.label & ~s.edge), np.argwhere(s.label & ~s.edge), np.argwhere(s.edge)) for s in self.samples
        ]

    def _one(self, augment_on: bool) -> tuple[np.ndarray, np.ndarray]:
        rng, p = self.rng, self.patch_px
        i = int(rng.integers(len(self.samples)))
        s = self.samples[i]
        kind = int(rng.choice(3, p=[0.25, 0.25, 0.5]))
        pts = self._where[i][kind]
        if len(pts) == 0:
            pts = np.argwhere(np.ones(s.label.shape, bool))
        cy, cx = pts[int(rng.integers(len(pts)))]
        img = np.pad(s.image, ((p, p), (p, p), (0, 0)), constant_values=255)
        lab = np.pad(s.label, ((p, p), (p, p)), constant_values=False)
        y0, x0 = (
            cy + p - p // 2 + int(rng.integers(-p // 4, p // 4 + 1)),
            cx + p - p // 2 + int(rng.integers(-p // 4, p // 4 + 1)),
        )
        x = img[y0 : y0 + p, x0 : x0 + p]
        y = lab[y0 : y0 + p, x0 : x0 + p]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        xf = augment(x, rng) if augment_on else x.astype(np.float32) / 255.0
        if augment_on and rng.random() < 0.25:
            xf = unscanned_rectangle(xf, y, rng)
        return xf, y.astype(np.float32)

    def batch(self, n: int, augment_on: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, p, p) float32 RGB in [0, 1] and (n, 1, p, p) float32 labels."""
        xs, ys = zip(*(self._one(augment_on) for _ in range(n)))
        return (
            np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2), dtype=np.float32),
            np.stack(ys)[:, None].astype(np.float32),
        )


def build_datasets(data_dir: Path, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples from ``shared/data``.

    Validation: the TCGA frozen section (an unseen slide, both real pyramid levels and
    virtual ones) and composites of an unseen tissue image (``hgsc_nest.jpg``).
    """
    rng = np.random.default_rng(seed)
    slides, images = data_dir / "slides", data_dir / "images"
    glass = glass_from_slide(slides / "kidney-48-5.tif")
    train: list[Sample] = []
    train += slide_samples(slides / "cmu-1-small-region.svs")
    train += slide_samples(slides / "kidney-48-5.tif", factors=(1, 2, 4))
    for stem in ("pen_markings_he_pen_red", "pen_markings_he_pen_green", "coverslip_edge_he_coverslip_edge"):
        train += artefact_samples(images / f"models_{stem}.png", images / f"models_{stem}_mask.png")
    train += composite_samples(
        [images / "histo.jpg", images / "ihc.png", images / "target_image.png"], glass, rng, n_per_source=6
    )
    val: list[Sample] = []
    val += slide_samples(slides / "tcga-cr-7395-01a-01-ts1.svs", factors=(1, 2, 4, 8))
    val += composite_samples([images / "hgsc_nest.jpg"], glass, np.random.default_rng(seed + 1), n_per_source=6)
    return train, val

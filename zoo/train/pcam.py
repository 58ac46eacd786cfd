"""PatchCamelyon patches (``shared/data/pcam/pcam-ai4all-trainval.zip``), read straight from the zip.

96x96 RGB JPEG patches of lymph-node H&E at about 10x (~0.97 um/px) from Camelyon16; label 1 means
metastatic tumour in the central 32x32 px (from pathologists' annotations), 0 none. Paths in the zip
are ``<split>/<label>/patchNNNNNNN.jpg`` with split ``train`` (10,000 + 10,000) or ``valid``
(1,500 + 1,500).

Packs (``.npz`` of the original JPEG bytes, never re-encoded) carry a seeded subset to a machine
without ``shared/`` (the GPU machine takes at most 64 MiB per call).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PCAM_MPP = 0.972  # um/px of the PatchCamelyon patches (Camelyon16 level 2 of 0.243 um/px)
PATCH_PX = 96


@dataclass
class JpegSet:
    """Original JPEG bytes with labels; decode with :meth:`decode`."""

    blobs: list[bytes]
    labels: np.ndarray  # (N,) int64, 1 = tumour
    names: list[str]

    def __len__(self) -> int:
        return len(self.blobs)

    def subset(self, idx: np.ndarray) -> JpegSet:
        return JpegSet([self.blobs[i] for i in idx], self.labels[idx], [self.names[i] for i in idx])

    def decode(self) -> np.ndarray:
        """(N, 96, 96, 3) uint8 RGB; a patch that does not decode cleanly raises."""
        return decode_jpegs(self.blobs)


def decode_jpegs(blobs: list[bytes]) -> np.ndarray:
    """Decode JPEG bytes to (N, H, W, 3) uint8 with libjpeg-turbo (simplejpeg, strict), else Pillow."""
    try:
        import simplejpeg

        return np.stack([simplejpeg.decode_jpeg(b, colorspace="RGB", strict=True) for b in blobs])
    except ImportError:  # the GPU machine may only have Pillow
        import io

        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def read_pcam(zip_path: str | Path, split: str) -> JpegSet:
    """All patches of ``split`` (``train`` or ``valid``), sorted by name so the order is reproducible."""
    if split not in ("train", "valid"):
        raise ValueError(f"split {split!r}: use 'train' or 'valid'")
    blobs, labels, names = [], [], []
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == split and parts[2].endswith(".jpg"):
                blobs.append(z.read(name))
                labels.append(int(parts[1]))
                names.append(name)
    if not blobs:
        raise FileNotFoundError(f"{zip_path}: no {split}/<label>/*.jpg patches; is this the PCam AI4ALL zip?")
    return JpegSet(blobs, np.asarray(labels, dtype=np.int64), names)


def balanced_split(labels: np.ndarray, n_per_class: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Seeded indices with ``n_per_class`` of each label, skipping ``exclude``."""
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(labels), bool)
    if exclude is not None:
        taken[exclude] = True
    out = []
    for c in np.unique(labels):
        pool = np.flatnonzero((labels == c) & ~taken)
        if len(pool) < n_per_class:
            raise ValueError(f"only {len(pool)} patches of class {c} left, {n_per_class} asked")
        out.append(rng.choice(pool, n_per_class, replace=False))
    return np.sort(np.concatenate(out))


def save_pack(path: Path, sets: dict[str, JpegSet], extra: dict[str, np.ndarray] | None = None) -> None:
    """Store several :class:`JpegSet` (original bytes, offsets, labels) in one ``.npz``."""
    arrays: dict[str, np.ndarray] = dict(extra or {})
    for key, s in sets.items():
        sizes = np.array([len(b) for b in s.blobs], dtype=np.int64)
        arrays[f"{key}_bytes"] = np.frombuffer(b"".join(s.blobs), dtype=np.uint8)
        arrays[f"{key}_offsets"] = np.concatenate([[0], np.cumsum(sizes)])
        arrays[f"{key}_labels"] = s.labels
        arrays[f"{key}_names"] = np.array(s.names)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def load_pack(path: Path, key: str) -> JpegSet:
    with np.load(path) as z:
        raw, off = z[f"{key}_bytes"], z[f"{key}_offsets"]
        blobs = [raw[off[i] : off[i + 1]].tobytes() for i in range(len(off) - 1)]
        return JpegSet(blobs, z[f"{key}_labels"].astype(np.int64), [str(n) for n in z[f"{key}_names"]])


def image_entropy(rgb: np.ndarray) -> np.ndarray:
    """Grey-level entropy in bits per image, exactly as the runner's entropy rails compute it."""
    from zoo.kinds.patch_classification import grey_entropy_bits

    x = np.asarray(rgb)
    return grey_entropy_bits(x[None] if x.ndim == 3 else x)

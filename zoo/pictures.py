"""Pictures people look at instead of reading: a result's overview and a batch's contact sheet.

``overview.png``: the slide's thumbnail with each class as a translucent fill and an outline
in its colour, a legend (class, area, fraction), a scale bar in mm and a caption with the model
and resolution. Drawn with matplotlib's Agg canvas on a Figure of its own (imported only when a picture is
made; pyplot's global state is never touched).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from zoo.labelmask import UNKNOWN_LABEL, RowSource, as_rows


def sample_mask(mask: np.ndarray | RowSource, out_shape: tuple[int, int], scale: float) -> np.ndarray:
    """Nearest-neighbour sample of a label mask onto a grid of ``out_shape`` whose pixels are ``scale``
    mask pixels wide (reads only the rows it needs)."""
    src = as_rows(mask)
    h, w = src.shape
    rows = np.minimum(((np.arange(out_shape[0]) + 0.5) * scale).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_shape[1]) + 0.5) * scale).astype(np.int64), w - 1)
    out = np.zeros(out_shape, np.uint8)
    for i, r in enumerate(rows):
        out[i] = src.read_rows(int(r), int(r) + 1)[0, cols]
    return out


def _nice_length_mm(width_mm: float) -> float:
    """A round scale-bar length near a fifth of the picture's width."""
    target = width_mm / 5
    if target <= 0:
        return 0.0
    base = 10 ** math.floor(math.log10(target))
    return max(m * base for m in (1, 2, 5) if m * base <= target) if target >= base else base


#: tallest overview canvas (inches at 120 dpi), whatever the slide's aspect
MAX_FIGURE_HEIGHT_IN = 16.0
#: the overview canvas' width (inches) and resolution (dots per inch)
OVERVIEW_WIDTH_IN, OVERVIEW_DPI = 8.0, 120
#: how opaque a class's fill is over the thumbnail
FILL_ALPHA = 0.38
#: zlib level of the PNG (Pillow's default is 6): 1 writes a slide's overview about 3x faster, 1.3x larger
PNG_COMPRESS_LEVEL = 1


def _fit_to_canvas(
    thumb: np.ndarray, labels: np.ndarray, um_per_px: float | None, max_px: float
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Thumbnail (Lanczos) and labels (nearest) shrunk to at most ``max_px`` on their longer side, with the µm
    per pixel of the result: the canvas cannot show more, and drawing a 2,000 px thumbnail and its class
    outlines into it took matplotlib 1.5-2 s of a 10 s run."""
    from PIL import Image

    h, w = labels.shape
    k = max_px / max(h, w)
    if k >= 1:
        return thumb, labels, um_per_px
    size = (max(1, round(w * k)), max(1, round(h * k)))
    small = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.LANCZOS))
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    return small, lab, None if um_per_px is None else um_per_px * w / size[0]


def render_overview(
    dest: Path,
    thumb: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[Any],
    um_per_px: float | None,
    caption: str,
    areas: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``overview.png`` (atomically; ``overwrite=False`` never replaces an existing file).

    The canvas is 8 inches wide and 1-16 inches tall whatever the slide's aspect (a 3000 x 1 px slide
    must not ask for a canvas of a million pixels), at 120 dpi.

    Args:
        thumb: (h, w, 3) uint8 slide thumbnail.
        labels: (h, w) class indices on the thumbnail's grid.
        classes: objects with ``index``, ``name`` and ``color`` (0-255 RGB); index 0 is not drawn.
        um_per_px: µm per thumbnail pixel (no scale bar when None).
        caption: one line under the picture.
        areas: class name -> {"area_mm2", "fraction"} for the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    thumb, labels, um_per_px = _fit_to_canvas(thumb, labels, um_per_px, OVERVIEW_DPI * OVERVIEW_WIDTH_IN)
    h, w = labels.shape
    fig_w = OVERVIEW_WIDTH_IN
    fig_h = min(max(fig_w * h / max(w, 1), 1.0), MAX_FIGURE_HEIGHT_IN)
    # a Figure of its own (not pyplot's: nothing global, no GUI backend to look for, 0.2 s less to import)
    fig = Figure(figsize=(fig_w, fig_h + 0.9), dpi=OVERVIEW_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    picture = thumb[..., :3].astype(np.float32)  # the class fills blended in here: one image to draw, not two
    handles = []
    shown = [c for c in classes if c.index != 0]
    if (labels == UNKNOWN_LABEL).any():
        shown.append(SimpleNamespace(index=UNKNOWN_LABEL, name="Unknown (undecodable)", color=(128, 128, 128)))
    for c in shown:
        sel = labels == c.index
        rgb = np.asarray(c.color, np.float32) / 255.0
        picture[sel] += FILL_ALPHA * (np.asarray(c.color, np.float32) - picture[sel])
        if sel.any() and 0 < sel.sum() < sel.size:
            ax.contour(sel.astype(np.float32), levels=[0.5], colors=[rgb], linewidths=1.2)
        a = (areas or {}).get(c.name)
        label = c.name
        if a and a.get("area_mm2") is not None:
            label += f": {a['area_mm2']:.3f} mm² ({a['fraction']:.1%})"
        elif a:
            label += f": {a['fraction']:.1%}"
        rgb_t = (float(rgb[0]), float(rgb[1]), float(rgb[2]))
        handles.append(Patch(facecolor=rgb_t, edgecolor=rgb_t, alpha=0.9, label=label))
    ax.imshow(np.rint(picture).astype(np.uint8), interpolation="bilinear")  # already Lanczos-shrunk to the canvas
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.85)
    if um_per_px:
        width_mm = w * um_per_px / 1000.0
        bar_mm = _nice_length_mm(width_mm)
        if bar_mm > 0:
            text = f"{bar_mm:g} mm" if bar_mm >= 1 else f"{bar_mm * 1000:g} µm"
            bar = AnchoredSizeBar(
                ax.transData, bar_mm * 1000.0 / um_per_px, text, "lower left", pad=0.5, frameon=True,
                size_vertical=max(1.0, h / 150), color="black",
            )  # fmt: skip
            bar.patch.set_alpha(0.8)
            ax.add_artist(bar)
    ax.set_axis_off()
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    from zoo.outputs import atomic_path

    with atomic_path(dest, overwrite) as tmp:
        fig.savefig(tmp, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return dest


def write_summary_html(dest: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``summary.html``: one card per slide (its overview, linked to its folder), status and areas."""
    cards = []
    for r in rows:
        folder = r.get("result_folder") or ""
        rel = os.path.relpath(folder, dest.parent) if folder else ""
        pic = Path(folder) / "overview.png" if folder else None
        img = (
            f'<a href="{html.escape(rel)}/"><img src="{html.escape(rel)}/overview.png" alt="overview"></a>'
            if pic is not None and pic.exists()
            else '<div class="none">no picture</div>'
        )
        detail = html.escape(str(r.get("message") or r.get("areas") or ""))
        cards.append(
            f'<div class="card {html.escape(r["status"])}">{img}<div class="t">{html.escape(Path(r["slide"]).name)}'
            f'</div><div class="s">{html.escape(r["status"])}</div><div class="d">{detail}</div></div>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>zoo batch summary</title>
<style>body{{font-family:sans-serif;margin:1em}}.card{{display:inline-block;vertical-align:top;width:260px;
margin:6px;padding:6px;border:1px solid #ccc;border-radius:6px}}img{{width:100%}}.t{{font-weight:bold;
word-break:break-all}}.failed{{background:#fee}}.skipped{{background:#eef}}.d{{font-size:80%}}
.none{{height:120px;background:#eee}}</style></head><body><h1>{len(rows)} slide(s)</h1>
{"".join(cards)}</body></html>
"""
    from zoo.outputs import atomic_path

    with atomic_path(dest) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return dest

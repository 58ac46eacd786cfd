"""Options shared by ``zoo run`` and ``zoo demo``."""

from __future__ import annotations

import argparse
from typing import get_args

from zoo.cli.common import int_at_least, nonneg_float, positive_float
from zoo.engines import ENGINES
from zoo.registry import Precision


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Every option of a run (resolution, engine, outputs, batch, progress), with help and defaults."""
    p.add_argument("--out", default="out", help="results folder (one sub-folder per slide)")
    p.add_argument(
        "--on-bad-tile",
        choices=["fail", "skip"],
        default="fail",
        help="a slide tile that cannot be decoded fails the slide, or (skip) is masked as unknown and "
        "listed in run.json (tifffile reader only)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=["tiff", "geojson", "probability"],
        default=["tiff", "geojson", "probability"],
        help="outputs: label mask TIFF, QuPath GeoJSON, per-class probability TIFFs (classes.csv and run.json always)",
    )
    p.add_argument(
        "--mpp", type=positive_float, default=None, help="run at this µm/px (default: the model's target_mpp)"
    )
    p.add_argument("--level", type=int_at_least(0), default=None, help="run on this pyramid level instead of --mpp")
    p.add_argument(
        "--slide-mpp",
        type=positive_float,
        default=None,
        help="level-0 µm/px of slides WITHOUT resolution metadata (default: from the objective power, else 0.5); "
        "refused for slides that state another one, unless --force-slide-mpp",
    )
    p.add_argument(
        "--force-slide-mpp",
        action="store_true",
        help="use --slide-mpp even for slides whose metadata states another resolution",
    )
    p.add_argument("--backend", choices=["auto", "openslide", "tifffile"], default="auto", help="slide reader")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="tiles per engine call (default: as many pixels as 8 tiles of 256 px: 57 of 96 px, 2 of 512 px)",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="ONNX Runtime execution providers (default: CUDA if available, then CPU)",
    )
    p.add_argument("--threads", type=int_at_least(0), default=0, help="CPU inference threads (0: one per core)")
    p.add_argument(
        "--reader-threads",
        type=int_at_least(1),
        default=1,
        help="threads reading and decoding tiles ahead of inference (a GPU needs several to be fed)",
    )
    p.add_argument(
        "--engine",
        choices=["auto", *ENGINES],
        default="auto",
        help="inference engine; auto picks the fastest the model's entry allows here that passes its check",
    )
    p.add_argument(
        "--precision",
        choices=["auto", *get_args(Precision)],
        default="auto",
        help="arithmetic precision (int8: the entry's quantised copy); each is verified against fp32 on the model's "
        "bundled test before use",
    )
    p.add_argument(
        "--all-tiles",
        dest="skip_background",
        action="store_false",
        help="run every tile, also those the thumbnail pre-mask calls glass (default: glass is skipped)",
    )
    p.add_argument("--simplify-um", type=nonneg_float, default=2.0, help="polygon simplification tolerance in µm")
    p.add_argument("--min-area-um2", type=nonneg_float, default=500.0, help="drop objects smaller than this (µm²)")
    p.add_argument(
        "--object-type",
        choices=["annotation", "detection"],
        default="annotation",
        help="QuPath object type of the GeoJSON features",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run slides whose results match the request (results are reused only when model, options "
        "and slide are unchanged)",
    )
    p.add_argument(
        "--workers",
        type=int_at_least(0),
        default=0,
        help="run slides on a local Dask cluster of N processes (0: no Dask; needs pip install '.[dask]')",
    )
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors (no progress, no result lines)")
    p.add_argument("--log", default=None, metavar="FILE", help="also append every message of the run to FILE")
    p.add_argument(
        "--device",
        type=int_at_least(0),
        default=None,
        help="GPU index for --engine torch (pip install '.[torch]' with a CUDA build of torch) or onnxruntime's "
        "CUDA provider (pip install '.[gpu]')",
    )
    p.add_argument(
        "--json", action="store_true", help="print per-slide results as JSON on stdout (and nothing else there)"
    )

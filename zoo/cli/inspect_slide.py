"""``zoo inspect``: a slide's levels, resolution and reader."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zoo.cli.common import print_result


def add_inspect(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo inspect`` command's options."""
    p = sub.add_parser("inspect", help="describe a slide (levels, resolution, backend)", formatter_class=fmt)
    p.add_argument("slide", help="slide file")
    p.add_argument("--backend", choices=["auto", "openslide", "tifffile"], default="auto", help="slide reader")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_inspect(args: argparse.Namespace) -> int:
    from zoo.slide import open_slide, slide_base_mpp

    with open_slide(args.slide, backend=args.backend) as s:
        info = s.describe()
        mpp0, source = slide_base_mpp(s)
        info["resolution_used"] = {"mpp": mpp0, "source": source}
        print_result(info, args.json)
    if source in ("assumed default", "objective power"):
        print(
            f"warning: {args.slide} has no resolution metadata; zoo will assume {mpp0:g} µm/px at level 0 "
            f"({source}); pass --slide-mpp to `zoo run` if that is wrong",
            file=sys.stderr,
        )
    return 0

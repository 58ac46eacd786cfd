"""``zoo show``: where a result's (or a batch's) pictures and tables are."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zoo.cli.common import print_result
from zoo.errors import OutputError


def add_show(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """The ``zoo show`` command's options."""
    p = sub.add_parser(
        "show",
        help="where a result's picture and tables are (OUT/<slide>), or a batch's summary (OUT)",
        formatter_class=fmt,
    )
    p.add_argument("result", help="a result folder written by `zoo run`, or its --out folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_show(args: argparse.Namespace) -> int:
    """Where a result's (or a batch's) pictures and tables are."""
    p = Path(args.result)
    if p.is_file() and p.name == "run.json":
        p = p.parent
    if (p / "run.json").is_file():
        info = json.loads((p / "run.json").read_text(encoding="utf-8"))
        out = {
            "picture": str(p / "overview.png") if (p / "overview.png").exists() else None,
            "slide": info.get("slide", {}).get("path"),
            "model": info.get("model", {}).get("id"),
            "classes": info.get("classes"),
            "files": sorted(x.name for x in p.iterdir() if not x.name.startswith(".")),
        }
    elif (p / "summary.html").is_file() or (p / "summary.csv").is_file():
        out = {
            "summary_html": str(p / "summary.html") if (p / "summary.html").exists() else None,
            "summary_csv": str(p / "summary.csv") if (p / "summary.csv").exists() else None,
            "results": sorted(str(x) for x in p.iterdir() if (x / "run.json").is_file()),
        }
    else:
        raise OutputError(f"{p}: not a result folder of `zoo run` (no run.json or summary); pass OUT/<slide> or OUT")
    if args.json:
        print_result(out, True)
    else:
        for k, v in out.items():
            print(f"{k}: {json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}")
    return 0

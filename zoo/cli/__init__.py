"""The ``zoo`` command line: one module per command (or pair of commands), one table that lists them.

Exit codes: 0 success, 1 failure (one ``error:`` line naming the file and the fix), 2 usage, 130 interrupted,
143 terminated. ``--json`` puts the machine-readable result alone on stdout. Adding a command is a module
with its ``add_<name>`` (options) and ``cmd_<name>`` (what it does) and one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from zoo.cli import convert, export, inspect_slide, models, register, run, show
from zoo.cli.common import EPILOG, HelpFormatter, bundled_slide, json_stdout
from zoo.errors import Terminated, ZooError, forget_signals, on_stop_signal

__all__ = ["COMMANDS", "build_parser", "bundled_slide", "main"]

#: (name, add its parser, run it), in the order ``zoo --help`` lists them
COMMANDS: list[tuple[str, Callable[[Any, type[argparse.HelpFormatter]], None], Callable[[argparse.Namespace], int]]] = [
    ("list", models.add_list, models.cmd_list),
    ("info", models.add_info, models.cmd_info),
    ("verify", models.add_verify, models.cmd_verify),
    ("inspect", inspect_slide.add_inspect, inspect_slide.cmd_inspect),
    ("run", run.add_run, run.cmd_run),
    ("show", show.add_show, show.cmd_show),
    ("demo", run.add_demo, run.cmd_demo),
    ("convert", convert.add_convert, convert.cmd_convert),
    ("edits", convert.add_edits, convert.cmd_edits),
    ("export", export.add_export, export.cmd_export),
    ("register", register.add_register, register.cmd_register),
    ("qupath-project", export.add_qupath_project, export.cmd_qupath_project),
]


def build_parser() -> argparse.ArgumentParser:
    """The ``zoo`` parser with every command of :data:`COMMANDS`."""
    fmt = HelpFormatter
    ap = argparse.ArgumentParser(
        prog="zoo",
        description="Pathology model zoo: run registered WSI segmentation models "
        "and bridge their results to QuPath and FastPathology.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    ap.add_argument("--registry", default=None, help="registry.yaml to use (default: $ZOO_REGISTRY or the bundled one)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for _name, add, _run in COMMANDS:
        add(sub, fmt)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one ``zoo`` command; returns its exit code (SIGINT/SIGTERM stop it with nothing partial left)."""
    args = build_parser().parse_args(argv)
    command = {name: fn for name, _add, fn in COMMANDS}[args.cmd]
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stop_signals}
    forget_signals()
    with contextlib.suppress(ValueError):  # not in the main thread (tests): keep the defaults
        for s in stop_signals:
            signal.signal(s, on_stop_signal)
    try:
        with json_stdout(getattr(args, "json", False)):
            return command(args)
    except ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: partial results were removed; run the same command again to finish", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: partial results were removed; run the same command again to finish", file=sys.stderr)
        return 143
    finally:
        with contextlib.suppress(ValueError):
            for s, handler in previous.items():
                if handler is not None:
                    signal.signal(s, handler)

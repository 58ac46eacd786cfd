"""What the commands share: help formatting, argument types, printing results, JSON on stdout, the run console."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

EPILOG = "Models: `zoo list`. Results of `zoo run` go to OUT/<slide name>/ (mask.tiff, annotations.geojson, run.json)."


def bundled_slide() -> Path:
    """The real slide shipped with the package (CMU-1-Small-Region, CC0, Aperio SVS)."""
    return Path(str(resources.files("zoo") / "data" / "cmu-1-small-region.svs"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once, and none for flags or options whose default is 'not given'."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number greater than 0")
    return v


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 <= v < math.inf):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number, 0 or more")
    return v


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text} must be {lo} or more")
        return v

    return parse


def class_mapping(text: str) -> tuple[str, str]:
    """argparse type: ``NAME=CLASS``."""
    name, sep, target = text.partition("=")
    if not sep or not name or not target:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=CLASS (for example Tumor=Tissue or 'Region*=Tissue')")
    return name, target


def class_map(items: list[tuple[str, str]]) -> dict[str, str]:
    return dict(items)


def print_result(obj: Any, as_json: bool) -> None:
    if as_json:
        emit_json(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            print(f"{k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    else:
        print(obj)


def say_replaced(paths: list[Path]) -> None:
    """With --force, say on stderr which existing files were replaced."""
    for p in paths:
        print(f"replaced {p} (--force)", file=sys.stderr)


class Console:
    """Where a run's messages go: result lines on stdout (not with --json or --quiet), warnings and
    errors on stderr, everything also to --log FILE."""

    def __init__(self, quiet: bool = False, as_json: bool = False, log: str | None = None) -> None:
        self.quiet, self.as_json = quiet, as_json
        self.log = open(log, "a", encoding="utf-8") if log else None

    def _log(self, line: str) -> None:
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def info(self, line: str) -> None:
        self._log(line)
        if not (self.quiet or self.as_json):
            print(line, flush=True)

    def note(self, line: str) -> None:
        self._log(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        self._log(line)
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.log:
            self.log.close()


#: Where JSON for machines goes when --json is given (the real stdout; see _json_stdout).
_JSON_OUT: list[Any] = []


def emit_json(obj: Any) -> None:
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    out.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.flush()


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """With --json, everything else that writes to stdout (libraries' C code included) goes to stderr."""
    if not enabled:
        yield
        return
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (OSError, ValueError, AttributeError):  # replaced stdout (tests, notebooks): Python-level only
        on_fd1 = False
    if not on_fd1:
        _JSON_OUT.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _JSON_OUT.pop()
        return
    sys.stdout.flush()
    saved = os.dup(1)
    real = os.fdopen(saved, "w", encoding="utf-8", closefd=True)
    os.dup2(2, 1)
    _JSON_OUT.append(real)
    try:
        yield
    finally:
        _JSON_OUT.pop()
        sys.stdout.flush()
        os.dup2(saved, 1)
        real.close()

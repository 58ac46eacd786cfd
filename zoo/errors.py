"""Exception hierarchy: one root, leaves that also subclass the matching built-in.

Every message names the offending value and the fix, on one line, so the CLI can
print ``str(err)`` and exit 1.
"""

from __future__ import annotations

import signal
from typing import Any


class ZooError(Exception):
    """Root of every error this project raises on purpose."""


class ModelNotFoundError(ZooError, KeyError):
    """A model name or version is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it plain
        return str(self.args[0]) if self.args else ""


class RegistryError(ZooError, ValueError):
    """``registry.yaml`` (or an entry in it) is malformed."""


class ChecksumMismatchError(ZooError, ValueError):
    """A weights file's sha256 differs from the one pinned in the registry."""


class WeightsNotFoundError(ZooError, FileNotFoundError):
    """A weights file named by the registry does not exist."""


class SlideOpenError(ZooError, OSError):
    """A slide is missing, unreadable or in a format no backend reads."""

    reason: str = ""


class BadTileError(SlideOpenError):
    """A slide tile cannot be decoded (damaged data, or a decoder warning such as "Corrupt JPEG data")."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class SlideLevelError(ZooError, ValueError):
    """A requested pyramid level or resolution does not exist for a slide."""


class SlideMppConflictError(ZooError, ValueError):
    """``--slide-mpp`` contradicts the resolution the slide file states."""


class OutputError(ZooError, OSError):
    """An output path cannot be written."""


class ModelInputError(ZooError, ValueError):
    """A model's inputs or outputs do not match what its registry entry says."""


class ModelOutputError(ModelInputError):
    """A network returned something that is not a probability (NaN, Inf, out of [0, 1], wrong channels).

    ``batch_index``: the first bad input of the batch, and ``where`` the words naming it in the message
    (the runner replaces them with the tile's position).
    """

    def __init__(self, message: str, batch_index: int | None = None, where: str = "") -> None:
        super().__init__(message)
        self.batch_index, self.where = batch_index, where


class OutputExistsError(ZooError, FileExistsError):
    """An output would overwrite a file the command was given, or an existing file without ``--force``."""


class GeoJSONError(ZooError, ValueError):
    """A GeoJSON file cannot be read as annotations."""


class FplError(ZooError, ValueError):
    """A FAST text pipeline cannot be parsed or a model cannot be exported to FAST."""


class ExportError(ZooError, ValueError):
    """A model cannot be written in another tool's format (WSInfer, bioimage.io); the message says why."""


class RegisterError(ZooError, ValueError):
    """A model cannot be registered as given (`zoo register`); the message says what to pass or fix."""


class ProviderError(ZooError, RuntimeError):
    """An inference provider or device that was asked for is not available on this machine."""


class DependencyError(ZooError, ImportError):
    """An optional dependency (an extra) is not installed; the message names the pip command."""


class QuPathUnavailableError(ZooError, ImportError):
    """paquo or QuPath is not installed."""


class Terminated(BaseException):
    """SIGTERM (or another stop signal), raised in the main thread so that partial results are removed."""


# Stop signals this process has received. A signal handler's exception can be swallowed by a library
# that wraps code in a bare ``except`` (some optional imports do); the long loops call
# ``raise_if_signalled`` between batches so that a stop request is never lost.
_signals_received: list[int] = []


def on_stop_signal(signum: int, frame: Any = None) -> None:
    """Signal handler for SIGINT and SIGTERM: remember the signal, then raise it."""
    _signals_received.append(signum)
    raise_if_signalled()


def raise_if_signalled() -> None:
    """Raise ``KeyboardInterrupt`` (SIGINT) or ``Terminated`` (others) if a stop signal has arrived."""
    if not _signals_received:
        return
    signum = _signals_received[-1]
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def forget_signals() -> None:
    """Start a new command with no stop request pending (the CLI's ``main`` can run many times in one process)."""
    _signals_received.clear()

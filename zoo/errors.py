"""Exception hierarchy: one root, leaves that also subclass the matching built-in.

Every message names the offending value and the fix, on one line, so the CLI can
print ``str(err)`` and exit 1.
"""

from __future__ import annotations


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


class GeoJSONError(ZooError, ValueError):
    """A GeoJSON file cannot be read as annotations."""


class FplError(ZooError, ValueError):
    """A FAST text pipeline cannot be parsed or a model cannot be exported to FAST."""


class ProviderError(ZooError, RuntimeError):
    """An inference provider or device that was asked for is not available on this machine."""


class DependencyError(ZooError, ImportError):
    """An optional dependency (an extra) is not installed; the message names the pip command."""


class QuPathUnavailableError(ZooError, ImportError):
    """paquo or QuPath is not installed."""

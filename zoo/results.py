"""Result folders: names that never leave ``--out``, one lock per folder, partial folders, publishing.

The rules (each tested in ``tests/zoo/test_jobs.py``):

* A slide's results go to ``<out>/<name>/`` where ``name`` is the slide's file stem
  made safe (letters, digits, ``._-``; no leading dot; at most 80 characters; never
  ``.``/``..``), so no path derived from a slide name can leave ``--out``. Slides whose
  safe names collide within a batch (``a/s.svs`` and ``b/s.svs``, ``case1.svs`` and
  ``case1.tif``, names differing only in case), or whose folder already holds another
  slide's results, get ``<name>-<8 hex digits of the slide's resolved path>``.
* Each (slide, model) keeps its own complete result: a folder that holds another model's
  results of the same slide is never written into; the second model's go to
  ``<name>-<model name>/`` (decided again under the lock, so concurrent runs of two models
  on one slide also end in two folders).
* Results are built in a hidden ``.<name>.XXXXXXXX.partial`` folder (marked as zoo's own)
  and moved into place when complete. A folder that exists already is only written into
  when its ``run.json`` says it holds this slide's results; then only the files this run
  writes are replaced, ``run.json`` last. Nothing else is ever deleted or overwritten.
* One lock per result folder (``<out>/.<name>.zoo-lock`` while it is held): concurrent runs on
  the same slide wait for each other; the holder removes stale partial folders of that
  name left by a killed run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from zoo.errors import OutputError

#: Files a result folder may hold that zoo writes (only these, and ``probability_<class>.tiff``, are replaced).
RESULT_FILES = {
    "tiff": "mask.tiff",
    "geojson": "annotations.geojson",
    "table": "classes.csv",
    "picture": "overview.png",
}
MAX_NAME_CHARS = 80
PARTIAL_MARKER = ".zoo-partial"
LOCK_TEXT = b"zoo result-folder lock\n"


# --------------------------------------------------------------------------- result folder names


def resolved(p: Path) -> Path:
    """``p`` resolved, or made absolute where it cannot be (a broken link, a loop)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def slide_stem(slide: Path) -> str:
    """The slide's name without its suffix (``x.ome.tif`` -> ``x``; a DICOM series folder -> its name)."""
    if slide.is_dir():
        return slide.name
    stem = slide.stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def safe_name(stem: str) -> str:
    """A result folder name from a slide's file stem: ``[A-Za-z0-9._-]``, no leading dot, never empty."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")
    name = name[:MAX_NAME_CHARS].rstrip(".")
    return name or "slide"


def slide_tag(slide: Path) -> str:
    """8 hex digits of the slide's resolved path (disambiguates colliding names, deterministically)."""
    return hashlib.sha256(str(resolved(slide)).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _owner(folder: Path) -> tuple[str | None, str | None]:
    """(resolved slide path, model name) whose results ``folder`` holds (from its run.json), else Nones."""
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(info, dict):
        return None, None
    src = (info.get("source") or {}).get("resolved_path") if isinstance(info.get("source"), dict) else None
    model = info.get("model")
    name = str(model.get("id", "")).partition("@")[0] if isinstance(model, dict) else None
    return (src if isinstance(src, str) else None), (name or None)


def writable_for(folder: Path, slide: Path, model: str | None = None) -> bool:
    """True when a run of ``model`` (a name or ``name@version``) on ``slide`` may write into ``folder``: it
    does not exist, is an empty real folder, or its run.json says it holds this slide's results from this
    model (any version; a run.json still being replaced names no model and counts as this model's).
    Anything else (a symlink, a file, another slide's or another model's results, files of unknown
    origin, a run.json without a source) is never written into."""
    if folder.is_symlink():
        return False
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    src, owner_model = _owner(folder)
    if src is None:
        return not any(folder.iterdir())
    wanted = model.partition("@")[0] if model else None
    return src == str(resolved(slide)) and (wanted is None or owner_model in (None, wanted))


def holds_other_model(folder: Path, slide: Path, model: str | None) -> bool:
    """True when ``folder`` holds ``slide``'s results from a model other than ``model``."""
    src, owner_model = _owner(folder)
    wanted = model.partition("@")[0] if model else None
    return src == str(resolved(slide)) and None not in (owner_model, wanted) and owner_model != wanted


def result_dirs(slides: Sequence[Path], out_dir: str | Path, model: str | None = None) -> dict[Path, Path]:
    """Each slide's result folder inside ``out_dir`` for ``model`` (see the module docstring for the rules)."""
    out = Path(out_dir)
    groups: dict[str, set[Path]] = {}
    for s in slides:
        groups.setdefault(safe_name(slide_stem(s)).casefold(), set()).add(resolved(s))
    model_tag = safe_name(model.partition("@")[0]) if model else ""
    dirs: dict[Path, Path] = {}
    for s in slides:
        base = safe_name(slide_stem(s))
        shared = len(groups[base.casefold()]) > 1
        name = base
        if not shared and not writable_for(out / base, s, model) and holds_other_model(out / base, s, model):
            name = f"{base[: MAX_NAME_CHARS - len(model_tag) - 1]}-{model_tag}"
        if shared or not writable_for(out / name, s, model):
            name = f"{name[: MAX_NAME_CHARS - 9]}-{slide_tag(s)}"
        dest = out / name
        if resolved(dest).parent != resolved(out):  # cannot happen with safe_name; never trust it blindly
            raise OutputError(f"{s}: result folder {dest} would leave {out}; rename the slide")
        dirs[s] = dest
    return dirs


def probability_file(class_name: str) -> str:
    """File name of a class's probability TIFF."""
    return f"probability_{safe_name(class_name)}.tiff"


# --------------------------------------------------------------------------- locking, leftovers, publishing


@contextlib.contextmanager
def result_lock(dest: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of result folder ``dest`` (waits for another zoo process holding it).

    The lock is ``<out>/.<name>.zoo-lock``. zoo writes ``LOCK_TEXT`` into the lock files it creates
    and removes on release only such a file (a file of that name that zoo did not write is used
    as the lock but never deleted); a waiter that wakes on a lock file that was removed meanwhile
    opens the new one, so two holders never coexist.
    """
    path = dest.parent / f".{dest.name}.zoo-lock"
    told = False
    while True:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
                os.write(fd, LOCK_TEXT)
            except FileExistsError:
                fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # removed between the two opens: try again
        except OSError as err:
            raise OutputError(
                f"{dest.parent}: cannot write results here ({err.strerror}); choose a writable --out folder"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait and not told:
                on_wait(f"{dest}: another zoo process is writing these results; waiting for it")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.pread(fd, len(LOCK_TEXT), 0) == LOCK_TEXT:  # only a lock file zoo itself wrote
                os.unlink(path)
        os.close(fd)


def remove_stale_partials(dest: Path) -> int:
    """Remove partial folders of ``dest`` left by a killed run (call with its lock held); return how many."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.partial$")
    n = 0
    with contextlib.suppress(OSError):
        for p in dest.parent.iterdir():
            if pattern.match(p.name) and p.is_dir() and not p.is_symlink() and (p / PARTIAL_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def check_writable(out_dir: str | Path) -> None:
    """Fail early (before any inference) if results cannot be written to ``out_dir``."""
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: --out is a file, not a folder; choose a folder")
        out.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".zoo-write-test.", dir=out)
        os.close(fd)
        os.unlink(name)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"{out}: cannot write results here ({err.strerror}); choose a writable --out folder") from err


def slide_identity(slide: Path) -> dict[str, Any]:
    """What identifies a slide's content cheaply: resolved path, size and modification time
    (for a DICOM series folder: the total size and the newest time of its files)."""
    if slide.is_dir():
        stats = [c.stat() for c in slide.iterdir() if c.is_file()]
        size, mtime = sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    else:
        st = slide.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return {"resolved_path": str(resolved(slide)), "size_bytes": size, "mtime_ns": mtime}


def make_partial(dest: Path) -> Path:
    """A new hidden partial folder beside ``dest`` (marked as zoo's own) to build results in."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        (work / PARTIAL_MARKER).write_text(f"{os.getpid()}\n", encoding="utf-8")
    except OSError as err:
        raise OutputError(
            f"{dest.parent}: cannot write results here ({err.strerror}); choose a writable --out folder"
        ) from err
    return work


def publish(work: Path, dest: Path, umask: int) -> None:
    """Move a finished partial folder into place; into an existing own folder file by file, run.json last."""
    (work / PARTIAL_MARKER).unlink()
    try:
        if not dest.exists():
            work.chmod(0o777 & ~umask)
            work.rename(dest)
            return
        # until the end the folder reads as this slide's (so a killed run can be redone) but incomplete
        info = json.loads((work / "run.json").read_text(encoding="utf-8"))
        marker = {"source": info["source"], "status": "being replaced; rerun to finish"}
        tmp = dest / ".run.json.replacing"
        tmp.write_text(json.dumps(marker), encoding="utf-8")
        os.replace(tmp, dest / "run.json")
        names = sorted((p.name for p in work.iterdir()), key=lambda n: n == "run.json")
        for name in names:
            os.replace(work / name, dest / name)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OutputError(f"{dest}: no space left on the device; free space or choose another --out") from err
        raise OutputError(f"{dest}: cannot move results into place ({err.strerror}); check --out") from err

"""This process's own resource figures, for run.json and the benchmarks."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB.

    Linux's ``VmHWM`` (the high-water mark of this process's own address space). ``ru_maxrss`` is not
    usable for that: Linux keeps it across ``exec``, so a process started by ``subprocess`` (vfork + exec)
    reports its parent's peak when that was higher (a 0.8 GB run read as 3.4 GB under pytest).
    Elsewhere (macOS, BSD) ``ru_maxrss`` is the fallback, in that system's unit.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

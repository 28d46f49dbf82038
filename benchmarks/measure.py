"""Peak resident memory of a command, measured by a fresh parent process of its own
(RUSAGE_CHILDREN of that parent covers exactly one child, re-executions included)."""

from __future__ import annotations

import subprocess
import sys
import time

_MEASURE = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def peak_rss_of(cmd, **kwargs) -> tuple:
    """(peak resident bytes, seconds) of `cmd`; raises SystemExit with its stderr on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return int(proc.stdout.strip().splitlines()[-1]) * 1024, seconds

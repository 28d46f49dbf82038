"""Helpers shared by the test areas (tests/models, pipelines, convert, cpu, cli, ...).

`tests/` is on sys.path (see tests/conftest.py), so test files import `support.NAME`.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parents[1] / "parity.py"


def max_rel(ours, ref) -> float:
    """max|ours - ref| / max|ref| in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def replace_file(path: Path, writer) -> None:
    """Replace a (symlinked) file of a checkpoint copy with new content."""
    if path.is_symlink():
        path.unlink()
    writer(path)


def assert_one_line_error(code, out, err, *fragments):
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def run_parity(fixture: Path, *extra: str):
    proc = subprocess.run([sys.executable, str(PARITY), str(fixture), *extra],
                          capture_output=True, text=True, timeout=600)
    status = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("ok", "FAIL", "SKIP"):
            status[parts[0]] = parts[1]
    return proc, status

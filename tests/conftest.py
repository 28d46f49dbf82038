"""Shared test setup: the official fixture, scratch checkpoints, the CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import lavit_mlx  # noqa: F401  (first: it gives MLX a fast BLAS before mlx is imported)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FIXTURE_CANDIDATES = [
    os.environ.get("LAVIT_FIXTURE", ""),
    str(ROOT.parent / "shared" / "fixtures" / "official-tiny"),
    "/work/shared/fixtures/official-tiny",
]


def find_fixture() -> Path | None:
    for candidate in FIXTURE_CANDIDATES:
        if candidate and (Path(candidate) / "expected.safetensors").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def official_tiny() -> Path:
    """The official-tiny fixture; in CI its absence is a failure, not a skip."""
    path = find_fixture()
    if path is None:
        message = "official-tiny fixture not found (set LAVIT_FIXTURE)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def official_checkpoint(official_tiny) -> Path:
    return official_tiny / "checkpoint"


@pytest.fixture
def checkpoint_copy(official_checkpoint, tmp_path):
    """A writable copy of the official-tiny checkpoint (files symlinked until replaced)."""

    def make(name: str = "ckpt") -> Path:
        dest = tmp_path / name
        for src in official_checkpoint.rglob("*"):
            target = dest / src.relative_to(official_checkpoint)
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(src)
        return dest

    return make


@pytest.fixture
def cli(tmp_path):
    """Run the `lavit` command in a subprocess: returns (returncode, stdout, stderr)."""
    import subprocess

    def run(*args, env=None, timeout=300):
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "lavit_cli.cli", *map(str, args)],
            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=tmp_path,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A random release-layout checkpoint (vision side) of other sizes than official-tiny."""
    from lavit_train.tiny import TinySpec, write_release_checkpoint

    return write_release_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint", TinySpec())
